"""RL update step, side by side: cotsafe_jax PPO / GRPO vs TRL (PPO from trl 1.12, GRPO from trl 1.16) vs
Tunix (google-tunix 0.1.7: PPO, GRPO), same shapes, float32, interleaved rounds in one run, medians.

Run: python benchmarks/rl_step.py [--rounds 3 --steps 2 --sides ours_ppo,trl_ppo,... --out FILE.json]

Shapes (all sides): a Qwen2 decoder with 4 layers, d_model 512, 8 heads / 2 kv heads of 64, MLP 1536, vocab
32000, untied; 32 completions of 64 prompt + 64 completion tokens (no padding); float32 params, activations
and optimizer state; AdamW (lr 1e-6); the batch of 32 split into 4 microbatches of 8 with gradients
accumulated into ONE optimizer step for the policy (and one for the critic). PPO has a critic (a second
4-layer backbone with a scalar head) and a frozen reference; GRPO has a reference and no critic.

What one timed step is, on each side (the reference never runs inside it: PPO puts the KL in the reward,
GRPO's KL term reads reference log-probs computed at scoring time, as every stack does):
  ours_ppo    cotsafe_jax.train.ppo_programs update (jit): per microbatch policy forward + fused log-prob /
              entropy + clipped PPO loss + backward, critic forward + clipped value loss + backward;
              global-norm clipping and AdamW for policy and critic. Timed to block_until_ready.
  ours_grpo   the same step with no critic, KL (k3) to the reference in the loss.
  trl_ppo     trl.experimental.ppo.PPOTrainer.train()'s own update loop (trl 1.12), timed from its
              per-epoch shuffle to its lr-scheduler step: per microbatch policy + value-model forward
              (PolicyAndValueWrapper), log-softmax over the [B, T, V] logits, clipped losses, one backward,
              accelerate's accumulation (the optimizer steps once, on the 4th microbatch; one AdamW over
              policy + critic), plus its no-grad stats (entropy from the full softmax) and the metrics
              block. TRL's loop has no gradient clipping. Rollout, reference, reward and GAE are outside.
  trl_grpo    trl.GRPOTrainer (trl 1.16) on a prepared batch: 4 x Trainer.training_step (compute_loss with
              TRL's per-token log-probs and entropies, KL (beta 0.001) in the loss, backward), then what
              Trainer's loop does per optimizer step: clip_grad_norm_(1.0), optimizer.step(),
              lr_scheduler.step(), zero_grad(). Generation is bypassed (_prepare_inputs is the identity).
  tunix_ppo   tunix.rl.rl_cluster.RLCluster.update_actor + update_critic on 4 prepared microbatch
              TrainExamples (mini_batch_size 32, train_micro_batch_size 8: optax.MultiSteps applies once),
              as PPOLearner's loop calls them: Tunix's PeftTrainer.train over the microbatches with the
              registered ppo policy / value losses. Tunix materialises [B, T, V] logits.
  tunix_grpo  update_actor with GRPOLearner's loss (beta 0.001: KL in the loss), no critic.
Compile / warm-up steps are not timed (--warmup each side, before the first round).

Equalised: float32 everywhere, the same shapes, 4 microbatches of 8 rows and one optimizer step per model,
AdamW at the same lr, clip ratio 0.2 (no dual clip, no clip-higher), no rematerialisation (TRL GRPO's default
gradient_checkpointing=True is turned off), token-mean loss aggregation (ours token-mean, TRL GRPO "bnpo",
Tunix GRPO loss_agg_mode "token-mean"). Not equalised, and part of what each stack is: how logits are
handled (ours: fused blockwise log-prob + entropy, never [B, T, V]; TRL GRPO: its chunked log-prob kernel
plus entropies; TRL PPO and Tunix: materialised float32 logits), jit scope (ours: the whole step incl. the
microbatch loop; Tunix: one jitted train step per microbatch plus its trainer's bookkeeping; TRL: eager
PyTorch), the GRPO KL estimator (ours k3, TRL k3, Tunix "kl"), TRL PPO's extra no-grad entropy stats and no
gradient clipping, and the CPU math libraries (XLA:CPU vs PyTorch's oneDNN / MKL, torch given --threads).

Each side runs in its own interpreter, kept alive across rounds; the PPO sides run together, then the GRPO
sides, each group in interleaved rounds (A B C A B C ...), so slow phases of a shared machine hit every side
of a comparison. The driver reports per-side median and min step seconds over rounds x steps, and the peak
RSS of each worker process (models, optimizer state, compiled programs and activations).

Separate environments (TRL 1.12 and 1.16 conflict; Tunix brings its own JAX stack), created once with:
  python3 -m venv /work/venvs/trl112  && /work/venvs/trl112/bin/pip install trl==1.12.0 torch==2.13.0 transformers==5.24.0
  python3 -m venv /work/venvs/trl_new && /work/venvs/trl_new/bin/pip install trl==1.16.0 torch==2.13.0 transformers==5.24.0
  python3 -m venv /work/venvs/tunix   && /work/venvs/tunix/bin/pip install google-tunix==0.1.7 jax==0.10.2
(--venv_root changes /work/venvs). Our side runs in the interpreter that runs this script.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "@@rl_step "
SIDES = ("ours_ppo", "ours_grpo", "trl_ppo", "trl_grpo", "tunix_ppo", "tunix_grpo")
VENVS = {"trl_ppo": "trl112", "trl_grpo": "trl_new", "tunix_ppo": "tunix", "tunix_grpo": "tunix"}
PIP = {"trl112": "trl==1.12.0 torch==2.13.0 transformers==5.24.0",
       "trl_new": "trl==1.16.0 torch==2.13.0 transformers==5.24.0",
       "tunix": "google-tunix==0.1.7 jax==0.10.2"}
MODEL = dict(vocab=32000, d=512, mlp=1536, layers=4, heads=8, kv_heads=2, head_dim=64, rope_theta=10000.0,
             eps=1e-6)
LR, KL_COEF_PPO, BETA_GRPO, CLIP = 1e-6, 0.05, 0.001, 0.2


# ---- the worker protocol: READY {info}; "run N" -> TIMES [s, ...]; "quit" ---------------------------
def _say(kind: str, payload) -> None:
  print(MARK + kind + " " + json.dumps(payload), flush=True)


def _serve(step, info: dict) -> None:
  """Answer the driver: run `step` N times per request, reply with the wall time of each."""
  _say("READY", info)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      return
    times = []
    for _ in range(int(cmd[1])):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    _say("TIMES", times)


def _data(args, seed: int = 0):
  """Random token batch and per-token tensors (values do not change the work of any step)."""
  import numpy as np
  rs = np.random.RandomState(seed)
  b, p, t = args.batch, args.prompt, args.completion
  return {"prompt": rs.randint(2, MODEL["vocab"], (b, p)).astype(np.int32),
          "completion": rs.randint(2, MODEL["vocab"], (b, t)).astype(np.int32),
          "old_logp": (-10.4 + 0.1 * rs.randn(b, t)).astype(np.float32),
          "ref_logp": (-10.4 + 0.1 * rs.randn(b, t)).astype(np.float32),
          "advantages": rs.randn(b, t).astype(np.float32),
          "returns": rs.randn(b, t).astype(np.float32),
          "values": rs.randn(b, t).astype(np.float32),
          "seq_advantages": rs.randn(b).astype(np.float32)}


# ---- ours --------------------------------------------------------------------------------------------
def worker_ours(args, algo: str) -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(HERE))
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cotsafe_jax import models, parallel, rl
  from cotsafe_jax.rl import ppo as ppo_lib
  from cotsafe_jax.train import ppo_programs
  from cotsafe_jax.train.ppo_trainer import OptimConfig
  from cotsafe_jax.types import ScoredRollout

  cfg = models.ModelConfig(model_type="qwen2", vocab_size=MODEL["vocab"], hidden_size=MODEL["d"],
                           intermediate_size=MODEL["mlp"], num_layers=MODEL["layers"], num_heads=MODEL["heads"],
                           num_kv_heads=MODEL["kv_heads"], head_dim=MODEL["head_dim"], qkv_bias=True,
                           rope_theta=MODEL["rope_theta"], rms_norm_eps=MODEL["eps"], max_position_embeddings=4096,
                           tie_word_embeddings=False, dtype=jnp.float32, param_dtype=jnp.float32)
  if algo == "ppo":
    ppo = ppo_lib.PPOConfig(advantage=rl.AdvantageConfig(estimator="gae"), kl_mode="reward",
                            kl_coef=KL_COEF_PPO, num_microbatches=args.micro,
                            policy_loss=rl.PolicyLoss(clip_low=CLIP, clip_high=CLIP, dual_clip_c=None),
                            value_loss=rl.ValueLoss(clip_eps=CLIP))
  else:
    ppo = ppo_lib.PPOConfig(advantage=rl.AdvantageConfig(estimator="grpo", group_size=8), kl_mode="loss",
                            kl_kind="k3", kl_coef=BETA_GRPO, num_microbatches=args.micro,
                            policy_loss=rl.PolicyLoss(clip_low=CLIP, clip_high=CLIP, dual_clip_c=None))
  tx = OptimConfig(learning_rate=LR, max_grad_norm=1.0).make(1000)
  b, t = args.batch, args.completion
  # the trainer's own programs (train/ppo_programs.py): state born sharded, jitted update with donation
  progs = ppo_programs.PPOPrograms(policy_cfg=cfg, critic_cfg=cfg if ppo.uses_critic else None, ppo=ppo,
                                   policy_tx=tx, critic_tx=tx if ppo.uses_critic else None,
                                   mesh=parallel.single_device_mesh(), rows=b, prompt_len=args.prompt,
                                   completion_len=t, sampling=ppo_programs.Sampling())
  state = progs.init_state(models.init_params(cfg, jax.random.key(0)), None, jnp.int32(2))
  d = _data(args)
  tokens = np.concatenate([d["prompt"], d["completion"]], 1)
  adv = d["advantages"] if algo == "ppo" else np.repeat(d["seq_advantages"][:, None], t, 1)
  batch = ScoredRollout(tokens_bs=jnp.asarray(tokens), mask_bs=jnp.ones(tokens.shape, bool),
                        completion_mask_bt=jnp.ones((b, t), bool), old_logp_bt=jnp.asarray(d["old_logp"]),
                        ref_logp_bt=jnp.asarray(d["ref_logp"]), old_values_bt=jnp.asarray(d["values"]),
                        advantages_bt=jnp.asarray(adv), returns_bt=jnp.asarray(d["returns"]))
  batch = jax.device_put(batch, progs.minibatch_shardings)
  update = progs.update
  holder = {"state": state}

  def step():
    holder["state"], metrics = update(holder["state"], batch, jnp.float32(ppo.kl_coef))
    jax.block_until_ready((holder["state"], metrics))

  for _ in range(args.warmup):
    step()
  _serve(step, {"stack": f"cotsafe_jax (jax {jax.__version__})", "algo": algo})


# ---- TRL ---------------------------------------------------------------------------------------------
def _hf_config(num_labels: int | None = None):
  from transformers import Qwen2Config
  kw = dict(vocab_size=MODEL["vocab"], hidden_size=MODEL["d"], intermediate_size=MODEL["mlp"],
            num_hidden_layers=MODEL["layers"], num_attention_heads=MODEL["heads"],
            num_key_value_heads=MODEL["kv_heads"], max_position_embeddings=4096, rope_theta=MODEL["rope_theta"],
            rms_norm_eps=MODEL["eps"], tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
            eos_token_id=1)
  if num_labels is not None:
    kw["num_labels"] = num_labels
  return Qwen2Config(**kw)


def _word_tokenizer():
  """A tokenizer over the ids t0..t31999 (t0 pad, t1 eos): TRL needs one; no text is tokenized in a step."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(MODEL["vocab"])}, unk_token="t2"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2",
                                 padding_side="left")


def worker_trl_ppo(args) -> None:
  import datasets
  import numpy as np
  import torch
  import trl
  from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification
  from trl.experimental.ppo import PPOConfig, PPOTrainer

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  policy = Qwen2ForCausalLM(_hf_config())
  policy.generation_config.eos_token_id = None  # every completion runs the full 64 tokens, as on the other sides
  ref = Qwen2ForCausalLM(_hf_config())
  value = Qwen2ForSequenceClassification(_hf_config(num_labels=1))
  reward = Qwen2ForSequenceClassification(_hf_config(num_labels=1))
  d = _data(args)
  total_steps = args.warmup + args.rounds * args.steps + 1
  ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, r)) for r in d["prompt"]]})
  import tempfile
  out = tempfile.mkdtemp(prefix="rl_step_trl_ppo_")
  config = PPOConfig(output_dir=out, per_device_train_batch_size=args.batch // args.micro,
                     gradient_accumulation_steps=args.micro, num_mini_batches=1, num_ppo_epochs=1,
                     total_episodes=args.batch * total_steps, response_length=args.completion,
                     local_rollout_forward_batch_size=args.batch, stop_token=None, missing_eos_penalty=None,
                     num_sample_generations=0, report_to=[], save_strategy="no", use_cpu=True,
                     learning_rate=LR, kl_coef=KL_COEF_PPO, cliprange=CLIP, cliprange_value=CLIP,
                     temperature=1.0, lr_scheduler_type="constant", logging_steps=10_000, seed=0,
                     dataloader_drop_last=True)
  trainer = PPOTrainer(args=config, processing_class=_word_tokenizer(), model=policy, ref_model=ref,
                       reward_model=reward, train_dataset=ds, value_model=value)
  module = sys.modules[PPOTrainer.__module__]
  marks = {"start": None, "times": [], "left": args.warmup, "warm": True}

  class _TimedRandom:  # the update phase starts with the per-epoch shuffle
    def __getattr__(self, name):
      return getattr(np.random, name)

    def permutation(self, *a, **k):
      if marks["start"] is None:
        marks["start"] = time.perf_counter()
      return np.random.permutation(*a, **k)

  class _NumpyProxy:
    random = _TimedRandom()

    def __getattr__(self, name):
      return getattr(np, name)

  module.np = _NumpyProxy()
  sched_step = trainer.lr_scheduler.step
  info = {"stack": f"trl {trl.__version__} (torch {torch.__version__}, {args.threads} threads)", "algo": "ppo"}

  def end_of_update(*a, **k):
    marks["times"].append(time.perf_counter() - marks["start"])
    marks["start"] = None
    marks["left"] -= 1
    if marks["left"] <= 0:  # hand control back to the driver between requests
      if marks["warm"]:
        marks["warm"] = False
        _say("READY", info)
      else:
        _say("TIMES", marks["times"])
      marks["times"] = []
      line = sys.stdin.readline().split()
      if not line or line[0] == "quit":
        os._exit(0)  # leave TRL's loop without its end-of-training work
      marks["left"] = int(line[1])
    return sched_step(*a, **k)

  trainer.lr_scheduler.step = end_of_update
  if args.warmup < 1:
    raise SystemExit("trl_ppo needs --warmup >= 1 (the hook reports READY after a step)")
  trainer.train()
  raise SystemExit(f"trl_ppo: the trainer ran out of its {total_steps} steps")


def worker_trl_grpo(args) -> None:
  import datasets
  import tempfile
  import torch
  import trl
  from transformers import Qwen2ForCausalLM
  from trl import GRPOConfig, GRPOTrainer

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  out = tempfile.mkdtemp(prefix="rl_step_trl_grpo_")
  # GRPOTrainer builds its reference model from the policy's path: give it a saved random policy
  Qwen2ForCausalLM(_hf_config()).save_pretrained(os.path.join(out, "policy"))
  ds = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7"] * args.batch})
  config = GRPOConfig(output_dir=os.path.join(out, "run"), model_init_kwargs={"dtype": torch.float32},
                      per_device_train_batch_size=args.batch // args.micro,
                      gradient_accumulation_steps=args.micro, num_generations=8,
                      max_completion_length=args.completion, beta=BETA_GRPO, epsilon=CLIP, loss_type="bnpo",
                      gradient_checkpointing=False,  # TRL GRPO's default is True; no side rematerialises here
                      learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[],
                      save_strategy="no", use_cpu=True, logging_steps=10_000, seed=0)
  trainer = GRPOTrainer(model=os.path.join(out, "policy"), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=config, train_dataset=ds, processing_class=_word_tokenizer())
  trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
  trainer._prepare_inputs = lambda inputs: inputs  # the batch below is already what generation would give
  trainer.current_gradient_accumulation_steps = args.micro  # what Trainer's loop sets before its steps
  model = trainer.model
  model.train()
  d = _data(args)
  mb = args.batch // args.micro
  ones = torch.ones(mb, args.completion, dtype=torch.long)
  micro = [{"prompt_ids": torch.from_numpy(d["prompt"][i:i + mb]).long(),
            "prompt_mask": torch.ones(mb, args.prompt, dtype=torch.long),
            "completion_ids": torch.from_numpy(d["completion"][i:i + mb]).long(), "completion_mask": ones,
            "advantages": torch.from_numpy(d["seq_advantages"][i:i + mb]),
            "old_per_token_logps": torch.from_numpy(d["old_logp"][i:i + mb]),
            "ref_per_token_logps": torch.from_numpy(d["ref_logp"][i:i + mb]),
            "num_items_in_batch": torch.tensor(float(args.batch * args.completion))}
           for i in range(0, args.batch, mb)]

  def step():
    for inputs in micro:
      trainer.training_step(model, inputs, num_items_in_batch=None)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()

  for _ in range(args.warmup):
    step()
  _serve(step, {"stack": f"trl {trl.__version__} (torch {torch.__version__}, {args.threads} threads)",
                "algo": "grpo"})


# ---- Tunix -------------------------------------------------------------------------------------------
def worker_tunix(args, algo: str) -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.rollout import base_rollout

  cfg = qwen2.ModelConfig(num_layers=MODEL["layers"], vocab_size=MODEL["vocab"], embed_dim=MODEL["d"],
                          hidden_dim=MODEL["mlp"], num_heads=MODEL["heads"], head_dim=MODEL["head_dim"],
                          num_kv_heads=MODEL["kv_heads"], rope_theta=int(MODEL["rope_theta"]),
                          norm_eps=MODEL["eps"], use_tied_embedding=False)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # Tunix's shardings
  with mesh:
    actor = qwen2.Qwen2(cfg, rngs=nnx.Rngs(0))
    reference = qwen2.Qwen2(cfg, rngs=nnx.Rngs(1))
    critic = None
    if algo == "ppo":
      critic = qwen2.Qwen2(cfg, rngs=nnx.Rngs(2))
      # the value model: the same backbone with a [D, 1] head in place of the [D, V] unembedding
      critic.lm_head = qwen2.Einsum(einsum_str="BTD,DV->BTV", shape=(MODEL["d"], 1), rngs=nnx.Rngs(3),
                                    sharding=cfg.shd_config.emb_dv, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.0))
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=opt, critic_optimizer=opt if algo == "ppo" else None, eval_every_n_steps=10**9,
      max_steps=10**6, mini_batch_size=args.batch, train_micro_batch_size=args.batch // args.micro)
  rollout = base_rollout.RolloutConfig(max_tokens_to_generate=args.completion, max_prompt_length=args.prompt,
                                       kv_cache_size=args.prompt + args.completion + 8, temperature=1.0)
  roles = {r: mesh for r in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                             rl_cluster_lib.Role.ROLLOUT, rl_cluster_lib.Role.CRITIC)}
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, critic=critic, reference=reference, tokenizer=_TunixTokenizer(),
      cluster_config=rl_cluster_lib.ClusterConfig(role_to_mesh=roles, rollout_engine="vanilla",
                                                  offload_to_cpu=False, training_config=training,
                                                  rollout_config=rollout))
  reward = lambda prompts, completions, **kw: [0.0] * len(completions)  # noqa: E731 - never called in a step
  d = _data(args)
  mb = args.batch // args.micro
  ones = jnp.ones((mb, args.completion), jnp.int32)
  if algo == "ppo":
    from tunix.rl.ppo import ppo_learner
    ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=ppo_learner.PPOConfig(
        beta=KL_COEF_PPO, epsilon=CLIP, clip_range_value=CLIP, gamma=1.0, gae_lambda=0.95), reward_fns=reward)
    examples = [ppo_learner.TrainExample(
        prompt_ids=jnp.asarray(d["prompt"][i:i + mb]), prompt_mask=jnp.ones((mb, args.prompt), jnp.int32),
        completion_ids=jnp.asarray(d["completion"][i:i + mb]), completion_mask=ones,
        advantages=jnp.asarray(d["advantages"][i:i + mb]), ref_per_token_logps=None,
        old_per_token_logps=jnp.asarray(d["old_logp"][i:i + mb]), returns=jnp.asarray(d["returns"][i:i + mb]),
        old_values=jnp.asarray(d["values"][i:i + mb])) for i in range(0, args.batch, mb)]
  else:
    from tunix.rl import common
    from tunix.rl.grpo import grpo_learner
    grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=grpo_learner.GRPOConfig(
        num_generations=8, beta=BETA_GRPO, epsilon=CLIP, loss_agg_mode="token-mean"), reward_fns=reward)
    examples = [common.TrainExample(
        prompt_ids=jnp.asarray(d["prompt"][i:i + mb]), prompt_mask=jnp.ones((mb, args.prompt), jnp.int32),
        completion_ids=jnp.asarray(d["completion"][i:i + mb]), completion_mask=ones,
        advantages=jnp.asarray(d["seq_advantages"][i:i + mb]), ref_per_token_logps=jnp.asarray(
            d["ref_logp"][i:i + mb]), old_per_token_logps=jnp.asarray(d["old_logp"][i:i + mb]))
        for i in range(0, args.batch, mb)]

  def step():
    cluster.update_actor(examples, None)
    if algo == "ppo":
      cluster.update_critic(examples, None)
    jax.block_until_ready((nnx.state(cluster.actor_trainer.model),
                           nnx.state(cluster.critic_trainer.model) if algo == "ppo" else None))

  for _ in range(args.warmup):
    step()
  import importlib.metadata
  _serve(step, {"stack": f"tunix {importlib.metadata.version('google-tunix')} (jax {jax.__version__})",
                "algo": algo})


class _TunixTokenizer:
  """The few methods Tunix's tokenizer adapter calls (ids only: no text is tokenized in a step)."""
  pad_id_ = 0

  def encode(self, text, **kw):
    return [int(t[1:]) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(f"t{int(i)}" for i in ids)

  def pad_id(self):
    return 0

  def eos_id(self):
    return 1

  def bos_id(self):
    return None

  pad_token_id, eos_token_id, bos_token_id = 0, 1, None


# ---- the driver --------------------------------------------------------------------------------------
def _python_for(side: str, venv_root: str) -> str:
  if side not in VENVS:
    return sys.executable
  venv = VENVS[side]
  python = os.path.join(venv_root, venv, "bin", "python")
  if not os.path.exists(python):
    raise SystemExit(f"rl_step: {side} needs the venv {os.path.join(venv_root, venv)} (missing); create it with:\n"
                     f"  python3 -m venv {os.path.join(venv_root, venv)} && "
                     f"{os.path.join(venv_root, venv, 'bin', 'pip')} install {PIP[venv]}\n"
                     f"or leave {side} out: --sides ...")
  return python


class _Worker:
  def __init__(self, side: str, python: str, argv: list[str]):
    self.side = side
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true")
    env.pop("XLA_FLAGS", None)  # one CPU device for JAX, as torch uses the whole CPU
    self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", side, *argv], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(HERE))
    self.info = self._expect("READY")

  def _expect(self, kind: str):
    for line in self.proc.stdout:
      if line.startswith(MARK):
        got, payload = line[len(MARK):].split(" ", 1)
        if got != kind:
          raise RuntimeError(f"{self.side}: expected {kind}, got {got}")
        return json.loads(payload)
    err = self.proc.stderr.read()
    raise SystemExit(f"rl_step: worker {self.side} exited ({self.proc.wait()}):\n{err[-6000:]}")

  def run(self, n: int) -> list[float]:
    self.proc.stdin.write(f"run {n}\n")
    self.proc.stdin.flush()
    return self._expect("TIMES")

  def peak_rss_mib(self) -> float | None:
    try:
      with open(f"/proc/{self.proc.pid}/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM"))
    except (OSError, StopIteration):
      return None

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


def _loadavg() -> float:
  return os.getloadavg()[0]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sides", default=",".join(SIDES))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the first round")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--completion", type=int, default=64)
  p.add_argument("--micro", type=int, default=4, help="microbatches per optimizer step")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
  p.add_argument("--venv_root", default="/work/venvs")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/rl_step_cpu.json)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    {"ours_ppo": lambda: worker_ours(args, "ppo"), "ours_grpo": lambda: worker_ours(args, "grpo"),
     "trl_ppo": lambda: worker_trl_ppo(args), "trl_grpo": lambda: worker_trl_grpo(args),
     "tunix_ppo": lambda: worker_tunix(args, "ppo"), "tunix_grpo": lambda: worker_tunix(args, "grpo")}[args.worker]()
    return

  sides = [s for s in args.sides.split(",") if s]
  unknown = [s for s in sides if s not in SIDES]
  if unknown:
    raise SystemExit(f"rl_step: unknown sides {unknown}, expected some of {', '.join(SIDES)}")
  if args.batch % args.micro or (args.batch // args.micro) % 8 and any("grpo" in s for s in sides):
    raise SystemExit("rl_step: --batch must split into --micro microbatches of whole GRPO groups of 8")
  pythons = {s: _python_for(s, args.venv_root) for s in sides}
  argv = [f"--{k}={getattr(args, k)}" for k in ("batch", "prompt", "completion", "micro", "threads", "warmup",
                                                  "rounds", "steps")]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import _common  # benchmarks/_common.py
  machine = _common.describe()
  times = {s: [] for s in sides}
  info, rss, loads = {}, {}, []
  # PPO sides, then GRPO sides: the comparisons are within an algorithm, and three workers alive at once (each
  # holds its models, optimizer state and compiled step) fit a shared 24 GiB machine where six may not
  for group in [[s for s in sides if s.endswith(algo)] for algo in ("ppo", "grpo")]:
    workers = {}
    try:
      for s in group:  # set up one at a time: compiles do not overlap
        t0 = time.perf_counter()
        workers[s] = _Worker(s, pythons[s], argv)
        info[s] = workers[s].info
        print(f"{s}: ready in {time.perf_counter() - t0:.0f} s ({info[s]['stack']})", flush=True)
      for r in range(args.rounds):
        for s in group:
          loads.append(_loadavg())
          got = workers[s].run(args.steps)
          times[s] += got
          print(f"round {r + 1} {s}: " + " ".join(f"{t:.3f}" for t in got), flush=True)
      rss.update({s: workers[s].peak_rss_mib() for s in group})
    finally:
      for w in workers.values():
        w.close()

  rows = []
  for s in sides:
    rows.append({"side": s, "stack": info[s]["stack"], "algo": info[s]["algo"],
                 "median_s": statistics.median(times[s]), "min_s": min(times[s]), "max_s": max(times[s]),
                 "n": len(times[s]), "times_s": times[s], "peak_rss_mib": rss[s]})
  base = {r["algo"]: r["median_s"] for r in rows if r["side"].startswith("ours")}
  print(f"\nmachine: {machine}; load average during the rounds {min(loads):.1f}-{max(loads):.1f}")
  print("| side | stack | median s / step | min s | vs ours (median) | peak RSS MiB |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    ratio = r["median_s"] / base[r["algo"]] if r["algo"] in base else float("nan")
    rss_s = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "-"
    print(f"| {r['side']} | {r['stack']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {ratio:.2f} | {rss_s} |")
  _common.write_json({"machine": machine, "shapes": {**MODEL, "batch": args.batch, "prompt": args.prompt,
                                                      "completion": args.completion, "microbatches": args.micro},
                      "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
                      "torch_threads": args.threads, "loadavg_min_max": [min(loads), max(loads)], "results": rows},
                     args.out, "rl_step_cpu.json")


if __name__ == "__main__":
  main()
