#!/bin/bash
# The real subspace study of docs/subspace.md: MiniLM-L6, 8 tasks, 4 methods, on a 2-core CPU.
# Every stage skips what runs/subspace/subspace.db already holds: re-run this script to resume.
# Three single-threaded lanes (one thread per process is much faster than one process with two
# threads when the cores are shared); logs in runs/subspace/lane-*.log.
set -u
cd "$(dirname "$0")/../.."
W=runs/subspace
DT() { OMP_NUM_THREADS=1 .venv/bin/deltatune subspace "$@" --workdir $W; }
if [ "${1:-}" != round3 ]; then  # rounds 1 and 2 (`run.sh round3` skips to round 3)
mkdir -p $W
DT init --tasks sst2,mr,subj,sms_spam,ag_news,cr,mpqa,tweet_eval_hate --unseen cr,mpqa,tweet_eval_hate \
  --lr adapter=5e-3 --lr lora=5e-3 --lr prefix=3e-3 --lr selective=5e-4 --k-shot 128 --dev-k 16 --n-eval 160 \
  --batch-size 16 --max-length 32 --steps 60 --eval-every 30 --head-lr 1e-2 --find-steps 12 --optimize-steps 30 \
  --said-steps 30 --d-max 1024 || exit 1
DT collect --tasks sst2,subj,ag_news > $W/collect-a.log 2>&1 &
DT collect --tasks mr,mpqa,tweet_eval_hate > $W/collect-b.log 2>&1 &
DT collect --tasks cr,sms_spam > $W/collect-c.log 2>&1 &
wait
lane() {  # tasks: single-task subspaces, optimization, transfer, landscape, intrinsic dimension
  DT find --which single --tasks "$1" && DT optimize --spaces single --tasks "$1" && DT transfer --tasks "$1" \
    && { [ -z "$2" ] || DT landscape --tasks "$2"; } && DT intrinsic-dim --tasks "$1"
}
lane sst2,subj,ag_news,cr sst2 > $W/lane-a.log 2>&1 &
lane mr,sms_spam,mpqa,tweet_eval_hate "" > $W/lane-b.log 2>&1 &
{ DT find --which multi && DT optimize --spaces multi,pca,random --tasks cr,mpqa,tweet_eval_hate \
    && DT transfer --tasks cr,mpqa,tweet_eval_hate && DT landscape --tasks cr; } > $W/lane-c.log 2>&1 &
wait
DT report --out results/subspace > $W/report.log 2>&1
cp $W/landscape/*.png results/subspace/ 2>/dev/null
echo "done: results/subspace/report.md"

# Round 2 (session 4): projections trained from scratch (scratch-* spaces, 150 finding steps per task)
# beside the warm-started ones, and the intrinsic-dimension search at 100 SAID steps up to d = 4096.
DT find --init random > $W/scratch.log 2>&1 \
  && DT optimize --spaces scratch-single,scratch-multi >> $W/scratch.log 2>&1 \
  && DT transfer >> $W/scratch.log 2>&1
DT intrinsic-dim --said-steps 100 --d-max 4096 > $W/intrinsic-100.log 2>&1
DT report --out results/subspace > $W/report.log 2>&1
fi  # end of rounds 1 and 2

# Round 3 (issue 19, item 6; `results/subspace/run.sh round3` runs only this): three solutions per (task,
# method), seeds 42, 43, 44, on the 5 seen tasks with round 1's settings, in a new work folder. Besides the
# in-sample single-task subspaces (found from seed 42's solutions), `find` builds held-out ones (heldout-<task>,
# from seeds 43 and 44 only); both are optimized and transferred against seed 42's solutions, so the report
# shows what a subspace found from OTHER solutions holds next to the by-construction in-sample numbers.
W=runs/subspace-seeds
mkdir -p $W
DT init --tasks sst2,mr,subj,sms_spam,ag_news --solution-seeds 42,43,44 \
  --lr adapter=5e-3 --lr lora=5e-3 --lr prefix=3e-3 --lr selective=5e-4 --k-shot 128 --dev-k 16 --n-eval 160 \
  --batch-size 16 --max-length 32 --steps 60 --eval-every 30 --head-lr 1e-2 --find-steps 12 --optimize-steps 30 \
  --said-steps 30 --d-max 1024 || exit 1
seeds_lane() {  # tasks: heads and 12 solutions each, then in-sample and held-out subspaces, optimization, transfer
  DT collect --tasks "$1" && DT find --which single,heldout --tasks "$1" \
    && DT optimize --spaces single,heldout --tasks "$1" && DT transfer --tasks "$1"
}
seeds_lane sst2,subj > $W/lane-a.log 2>&1 &
seeds_lane mr,sms_spam > $W/lane-b.log 2>&1 &
seeds_lane ag_news > $W/lane-c.log 2>&1 &
wait
DT report --out results/subspace-seeds > $W/report.log 2>&1
echo "done: results/subspace-seeds/report.md"
