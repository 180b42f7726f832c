#!/usr/bin/env bash
# A GPU part that may outlast one device call (10 minutes): start it detached, follow it, collect it.
#   bash tools/gpu_bg.sh start "PART ARGS" ...   run `python3 tools/gpu_run.py PART ARGS` for each, one after
#                                               another, in a session of its own
#   bash tools/gpu_bg.sh wait            follow it until it ends or this call nears its limit
# Either call follows the run for up to GPU_BG_FOLLOW seconds (default 560), then copies what the
# run has written so far into $OUT; run `wait` again (while the machine is warm) if it is not done.
set -uo pipefail
dir=/tmp/gpu-bg
case "$1" in
  start)
    shift
    rm -rf "$dir" && mkdir -p "$dir/out"
    # setsid: the device ends a call's processes when it returns, except those in a session of their own
    chain="echo \$\$ >$dir/pid; "  # its own pid: setsid may fork
    for part in "$@"; do chain+="python3 tools/gpu_run.py $part; "; done
    OUT="$dir/out" PYTHONUNBUFFERED=1 setsid bash -c "$chain" >"$dir/log" 2>&1 </dev/null &
    sleep 1
    ;;
  wait) ;;
  *) echo "usage: gpu_bg.sh start \"PART ARGS\"... | wait" >&2; exit 2 ;;
esac
pid=$(cat "$dir/pid")
end=$((SECONDS + ${GPU_BG_FOLLOW:-560}))
shown=$(cat "$dir/shown" 2>/dev/null || echo 0)
while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do
  sleep 5
  # the run's own progress lines, not vLLM's log
  n=$(wc -l <"$dir/log"); grep -a '^\[[0-9:]*\]' <(tail -n +$((shown + 1)) "$dir/log" | head -n $((n - shown))); shown=$n
  echo "$shown" >"$dir/shown"
done
cp "$dir"/out/* "$OUT"/ 2>/dev/null
cp "$dir/log" "$OUT/run.log"
if kill -0 "$pid" 2>/dev/null; then
  echo "still running: call 'bash tools/gpu_bg.sh wait' again"
else
  tail -n 30 "$dir/log" | grep -av '^\[[0-9:]*\]'
  echo "finished; files: $(ls "$dir/out" | tr '\n' ' ')"
fi
