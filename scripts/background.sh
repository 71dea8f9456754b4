#!/usr/bin/env bash
# Long resumable jobs (training, attack runs) in the background at the lowest CPU
# priority, so that foreground work on a shared machine keeps the cores.
#
#   bash scripts/background.sh start DIR COMMAND...   # log in DIR/log.txt, pid in DIR/pid
#   bash scripts/background.sh pause DIR              # SIGSTOP the job (e.g. for a benchmark)
#   bash scripts/background.sh resume DIR             # SIGCONT
#   bash scripts/background.sh status DIR
#
# `nice` alone is not enough: with the kernel's autogroup scheduling (the default on
# most Linux desktops and servers) nice orders processes only within one autogroup,
# and each autogroup gets an equal share; setsid starts a new one. So the job starts
# in an autogroup of its own (setsid), that autogroup gets the lowest weight
# (/proc/PID/autogroup), and the job runs at nice 19 inside it. Stopping the job (pause, or kill) acts on its whole
# process group. The job itself must resume from DIR after any stop.
set -euo pipefail

usage() {
  sed -n '4,8p' "$0" | sed 's/^# *//' >&2
  exit 2
}
[ $# -ge 2 ] || usage
action=$1 dir=$2
shift 2
pidfile="$dir/pid"

running() {  # the pid file's process exists and has not ended (a zombie has)
  [ -f "$pidfile" ] || return 1
  local stat
  stat=$(ps -o stat= -p "$(cat "$pidfile")" 2>/dev/null) || return 1
  [ -n "$stat" ] && [ "${stat:0:1}" != Z ]
}

case "$action" in
  start)
    [ $# -ge 1 ] || usage
    if running; then
      echo "background.sh: $dir already has a running job (pid $(cat "$pidfile"))" >&2
      exit 1
    fi
    mkdir -p "$dir"
    [ -f "$dir/log.txt" ] && cat "$dir/log.txt" >> "$dir/log.previous.txt"
    setsid nice -n 19 "$@" > "$dir/log.txt" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$pidfile"
    # Once setsid has run (the job leads its own autogroup), lower the autogroup's weight.
    for _ in $(seq 100); do
      [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] && break
      sleep 0.05
    done
    if [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ] && [ -w "/proc/$pid/autogroup" ]; then
      echo 19 > "/proc/$pid/autogroup" || true
    fi
    echo "started pid $pid ($(cat "/proc/$pid/autogroup" 2>/dev/null || echo 'no autogroup')); log: $dir/log.txt"
    ;;
  pause | resume | status)
    if ! running; then
      echo "background.sh: no running job in $dir (no $pidfile, or its process has ended)" >&2
      exit 1
    fi
    pid=$(cat "$pidfile")
    case "$action" in
      pause) kill -STOP -- "-$pid" && echo "paused pid $pid" ;;
      resume) kill -CONT -- "-$pid" && echo "resumed pid $pid" ;;
      status) ps -o pid,stat,ni,etime,time,args -g "$pid" ;;
    esac
    ;;
  *) usage ;;
esac
