#!/usr/bin/env bash
# A list of benchmark commands run one after another in the background on the GPU machine, so a session's
# device minutes go to work and not to the gaps between calls; each device call then only polls.
#   bench/device_queue.sh start QUEUE_FILE...  one command per line (blank lines and # comments skipped),
#                                              the files' jobs in order, a command already listed skipped;
#                                              run from the repo root with bash; returns at once
#   bench/device_queue.sh poll [SECONDS=240]   wait, then print each job's state and its log's last line;
#                                              every log, exit status and whatever jobs wrote to $QUEUE/out
#                                              go to $OUT/queue.tar (one file: a call brings back 8 at most)
# QUEUE (default /tmp/keep/queue) holds NN.cmd, NN.log and NN.rc (exit status) per job, and out/ for a job's
# own files (jobs see it as $QUEUE_OUT). A failed job does not stop the next: its exit status is kept.
# Started again on the same QUEUE, jobs that already have an NN.rc of 0 are skipped (a queue cut off by the
# machine's release is simply started again on a fresh one after the staging calls).
set -euo pipefail
queue=${QUEUE:-/tmp/keep/queue}
bring_back() {
  [ -n "${OUT:-}" ] || return 0
  # tar's exit 1: a log grew while read (a running job's); what it took is still a valid archive
  (cd "$queue" && shopt -s nullglob && { tar -cf "$OUT/queue.tar.tmp" -- *.log *.rc out || [ $? = 1 ]; } &&
    mv "$OUT/queue.tar.tmp" "$OUT/queue.tar") || true
}
case ${1:?start or poll} in
start)
  shift
  [ $# -gt 0 ] || { echo "error: start needs a queue file" >&2; exit 2; }
  for file; do [ -r "$file" ] || { echo "error: $file: no such queue file" >&2; exit 2; }; done
  mkdir -p "$queue/out"
  n=0
  declare -A listed=()
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in '' | '#'*) continue ;; esac
    [ -z "${listed[$line]:-}" ] || continue
    listed[$line]=1
    n=$((n + 1))
    printf '%s\n' "$line" > "$queue/$(printf %02d $n).cmd"
  done < <(awk 1 "$@")  # awk: a file without a final newline still ends its line
  [ "$n" -gt 0 ] || { echo "error: $* holds no command" >&2; exit 2; }
  export QUEUE_OUT=$queue/out
  rm -f "$queue/DONE"
  setsid nohup bash -c '
    for cmd in "$0"/*.cmd; do
      job=${cmd%.cmd}
      [ "$(cat "$job.rc" 2>/dev/null)" = 0 ] && continue
      rm -f "$job.rc"
      echo "[$(date -u +%T)] $(cat "$cmd")" > "$job.log"
      rc=0; bash "$cmd" >> "$job.log" 2>&1 < /dev/null || rc=$?
      echo "[$(date -u +%T)] exit $rc" >> "$job.log"
      echo "$rc" > "$job.rc"
    done
    touch "$0/DONE"' "$queue" > "$queue/runner.log" 2>&1 < /dev/null &
  echo "queue of $n job(s) started in $queue"
  ;;
poll)
  total=${2:-240}
  for ((waited = 0; waited < total; waited += 60)); do
    sleep $((total - waited < 60 ? total - waited : 60))
    bring_back
    [ -e "$queue/DONE" ] && break
  done
  bring_back
  for cmd in "$queue"/*.cmd; do
    [ -e "$cmd" ] || { echo "no queue in $queue"; exit 1; }
    job=${cmd%.cmd}
    if [ -e "$job.rc" ]; then state="exit $(cat "$job.rc")"
    elif [ -e "$job.log" ]; then state=running
    else state=waiting; fi
    last=$(tail -c 300 "$job.log" 2>/dev/null | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1 || true)
    echo "$(basename "$job") $state: $(head -c 80 "$cmd")${last:+ | $last}"
  done
  if [ -e "$queue/DONE" ]; then echo "ALL DONE"; fi
  ;;
*) echo "error: $1: start or poll" >&2; exit 2 ;;
esac
