#!/usr/bin/env bash
# Run cotsafe_jax on every worker of a GCP TPU VM slice (a pod): the same checkout, venv and command on each;
# jax.distributed starts from the TPU metadata on its own (launch/tpu_run.py), every worker feeds its devices.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE [--project=P] [--copy] [--ref=REV]
#       every worker: this checkout's commit (git clone of its origin, or --copy: `git archive` of it sent over
#       scp, for a repo the workers cannot reach) in ~/cotsafe_jax, a venv there, pip install -e '.[tpu]'
#   launch/tpu_pod.sh run TPU_NAME ZONE [--project=P] [--no-follow] -- LAUNCHER_ARGS...
#       every worker: python launch/tpu_run.py LAUNCHER_ARGS in the background (nohup: a dropped ssh does not
#       stop it), output in ~/cotsafe_jax/run.log; then follows worker 0's log (Ctrl-C stops following only)
#   launch/tpu_pod.sh stop TPU_NAME ZONE [--project=P]
#       SIGTERM to the job on every worker: all finish the current step, save a checkpoint and exit 0; `run`
#       with the same arguments resumes it
#
# Use a gs:// workdir (--workdir=gs://BUCKET/run): every worker writes its checkpoint shards there and reads
# the same files; a local path would be a different disk on each worker. Data paths may be gs:// too.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 3 ] || usage
cmd="$1"; tpu="$2"; zone="$3"; shift 3
project=() copy=0 ref="" follow=1
while [ $# -gt 0 ]; do
  case "$1" in
    --project=*) project=(--project "${1#--project=}") ;;
    --copy) copy=1 ;;
    --ref=*) ref="${1#--ref=}" ;;
    --no-follow) follow=0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (launcher arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
dir='~/cotsafe_jax'
repo_root="$(cd "$(dirname "$0")/.." && pwd)"

# on a worker: is the job of run.pid alive (an exited one not yet reaped is a zombie: not alive)
alive='alive() { [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null && [ "$(ps -o stat= -p "$(cat run.pid)" | cut -c1)" != Z ]; }'

on_all() {  # run a bash command on every worker
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all --command "$1"
}

case "$cmd" in
  setup)
    ref="${ref:-$(git -C "$repo_root" rev-parse HEAD)}"
    if [ -n "$(git -C "$repo_root" status --porcelain --untracked-files=no)" ]; then
      echo "tpu_pod.sh: note: uncommitted changes are not sent; the workers get commit $ref" >&2
    fi
    if [ "$copy" = 1 ]; then
      archive="$(mktemp -d)/cotsafe_jax.tar.gz"
      git -C "$repo_root" archive --format=tar.gz -o "$archive" "$ref"
      gcloud compute tpus tpu-vm scp "$archive" "$tpu:cotsafe_jax.tar.gz" --zone "$zone" "${project[@]}" --worker=all
      fetch="rm -rf $dir/src_new && mkdir -p $dir/src_new && tar -xzf ~/cotsafe_jax.tar.gz -C $dir/src_new && \
cp -a $dir/src_new/. $dir/ && rm -rf $dir/src_new ~/cotsafe_jax.tar.gz"
    else
      url="$(git -C "$repo_root" remote get-url origin)"
      fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $(printf '%q' "$url") $dir; fi \
&& git -C $dir checkout --quiet --detach $ref"
    fi
    # jax >= 0.7 needs Python >= 3.11; TPU VM images may ship 3.10: uv provides a 3.12 venv either way
    on_all "set -e; mkdir -p $dir; $fetch; cd $dir; \
python3 -m pip install --user --quiet --upgrade uv 2>/dev/null || python3 -m pip install --user --quiet --break-system-packages --upgrade uv; \
[ -x .venv/bin/python ] || ~/.local/bin/uv venv --quiet --seed --python 3.12 .venv; . .venv/bin/activate; \
pip install --quiet --upgrade pip; pip install --quiet -e '.[tpu]'; \
python -c 'import jax, cotsafe_jax; print(\"worker ready:\", jax.__version__, \"$ref\"[:12])'"
    ;;
  run)
    [ $# -gt 0 ] || { echo "tpu_pod.sh run: give the launcher arguments after --" >&2; exit 2; }
    args=$(printf ' %q' "$@")
    on_all "set -e; cd $dir; $alive; if alive; then \
echo \"a job is running (pid \$(cat run.pid)); stop it first\" >&2; exit 1; fi; . .venv/bin/activate; \
nohup python launch/tpu_run.py$args > run.log 2>&1 < /dev/null & echo \$! > run.pid; echo \"started pid \$!\""
    if [ "$follow" = 1 ]; then
      gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=0 \
        --command "tail -n +1 -F $dir/run.log --pid=\$(cat $dir/run.pid)"
    fi
    ;;
  stop)
    on_all "cd $dir; $alive; if alive; then kill -TERM \$(cat run.pid); while alive; do sleep 1; done; \
echo stopped; tail -n 2 run.log; else echo 'no job running'; fi"
    ;;
  *) usage ;;
esac
