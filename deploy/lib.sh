# What deploy/up.sh and tests/bench/http.sh both do with the processes they run: start them
# with their logs in "$dir/logs", wait for them on loopback, refuse ports already taken.
# Sourced, not run. The caller sets `prog` (for messages), `dir` and `pids=()`, and stops
# "${pids[@]}" itself.

# Starts a command in the background, its output in "$dir/logs/<name>.log".
start() { # name, command...
  local name="$1"
  shift
  "$@" >"$dir/logs/$name.log" 2>&1 &
  pids+=("$!")
}

# Whether something accepts TCP on 127.0.0.1:$1 (bash's /dev/tcp: no curl needed). The
# subshell keeps the descriptor and the 2>/dev/null its own.
listening() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Says what failed and shows the log of `name`, then exits.
give_up() { # name, what happened
  echo "$prog: $1 $2; its log:" >&2
  cat "$dir/logs/$1.log" >&2
  exit 1
}

# Waits up to 10 s for something to accept TCP on 127.0.0.1:$port.
wait_tcp() { # port, name
  for _ in $(seq 1 100); do
    if listening "$1"; then return 0; fi
    sleep 0.1
  done
  give_up "$2" "did not start"
}

# Waits up to 10 s for `GET path` on 127.0.0.1:$port to answer 200; `what` says what failing
# means, for the message.
wait_http() { # port, path, name, what
  local port="$1" path="$2" status=""
  for _ in $(seq 1 100); do
    # Braces: the 2>/dev/null is the connect's alone, not the script's from here on.
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      printf 'GET %s HTTP/1.0\r\n\r\n' "$path" >&3
      read -r -t 2 _ status _ <&3 || true
      exec 3<&-
      if [ "$status" = 200 ]; then return 0; fi
    fi
    sleep 0.1
  done
  give_up "$3" "$4"
}

# Exits when any of the ports is taken: something else would answer there and be taken for
# ours. `hint` says what to do about it.
refuse_busy() { # hint, port...
  local hint="$1"
  shift
  for port in "$@"; do
    if listening "$port"; then
      echo "$prog: 127.0.0.1:$port is in use ($hint)" >&2
      exit 1
    fi
  done
}
