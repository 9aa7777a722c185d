#!/bin/bash
# Supervisor: one at a time (flock); SIGKILL at 21 GB anonymous resident (as the OOM killer would), restart on exit.
exec 9>/work/probe/supervisor.lock
flock -n 9 || exit 0
cd /work/study2d-wt
# Each compiled program holds memory mappings; the kernel default (65,530) is the likely cause of a compile that
# aborted (LLVM "Cannot allocate memory") with most of the memory free. Raise it where we may (root).
[ "$(cat /proc/sys/vm/max_map_count)" -lt 262144 ] && { echo 262144 > /proc/sys/vm/max_map_count; } 2>/dev/null
echo "$(date +%F' '%T) session 14 start" >> /work/probe/supervisor.log
while [ ! -e /work/probe/stop ]; do
  /work/study2dvenv/bin/python /work/probe/study_monitor.py --model=qwen2.5-coder-0.5b-instruct --dataset=gsm8k \
    --num_problems=200 --methods=baseline,resample,rosa,words,rosa2,words-ref,rosa2-ref --max_turns=5 \
    --max_new_tokens=512 --max_context=3072 --slots=16 --sessions=16 --problems_per_round=32 --decode_dtype=bfloat16 \
    --run_dir=/work/main/results/qwen05-gsm8k-k5-study2 >> /work/probe/study.log 2>&1 &
  pid=$!
  echo "$(date +%F' '%T) started $pid" >> /work/probe/supervisor.log
  while kill -0 $pid 2>/dev/null; do
    anon=$(awk '/RssAnon/{print $2}' /proc/$pid/status 2>/dev/null)
    if [ -n "$anon" ] && [ "$anon" -gt $((21 * 1024 * 1024)) ]; then
      echo "$(date +%F' '%T) kill $pid at ${anon} kB" >> /work/probe/supervisor.log; kill -9 $pid
    fi
    if [ -e /work/probe/stop ]; then
      echo "$(date +%F' '%T) stop file: kill $pid" >> /work/probe/supervisor.log; kill -9 $pid
    fi
    sleep 5
  done
  wait $pid; rc=$?
  echo "$(date +%F' '%T) exited $pid rc=$rc" >> /work/probe/supervisor.log
  [ "$rc" = 0 ] && break
  sleep 10
done
