"""The study of issue 14, "Beyond SFT" in miniature made fair: the task with held-out categories (task), the
near-duplicate check (dedup), the judge and the RM's verdicts (judge), rejection-sampling fine-tuning data (rft),
intervals over seeds and prompts (stats), the run (run) and its summary.json and tables (summary)."""
from cotsafe_jax.study.dedup import ShingleIndex, shingles, similarity
from cotsafe_jax.study.judge import StudyJudge, agreement, rm_verdicts
from cotsafe_jax.study.rft import RFTConfig, best_of_n
from cotsafe_jax.study.run import ARMS, POLICIES, EvalSettings, PPOArms, RMConfig, Tuning, run_study
from cotsafe_jax.study.stats import hierarchical_bootstrap, metric_over_seeds, paired_difference, prompt_values
from cotsafe_jax.study.task import (StudyTask, TaskConfig, check_heldout_absent, check_no_near_duplicates,
                                    discloses_procedure, is_reflection, judge_response, make_task, write_task)

__all__ = ["ARMS", "POLICIES", "EvalSettings", "PPOArms", "RFTConfig", "RMConfig", "ShingleIndex", "StudyJudge",
           "StudyTask", "TaskConfig", "Tuning", "agreement", "best_of_n", "check_heldout_absent",
           "check_no_near_duplicates", "discloses_procedure", "hierarchical_bootstrap", "is_reflection",
           "judge_response", "make_task", "metric_over_seeds", "paired_difference", "prompt_values", "rm_verdicts",
           "run_study", "shingles", "similarity", "write_task"]
