#!/usr/bin/env bash
# Start or stop the Docker engine that the docker-marked tests need.
#
#   bash .ci/docker.sh start   install docker.io and debootstrap with apt-get if missing, start
#                              dockerd in the background if no engine answers, wait for `docker info`
#   bash .ci/docker.sh stop    stop the dockerd that `start` started (nothing else)
#
# An engine that already answers is used as it is and never stopped. The pid of a dockerd
# started here is kept in $STATE (default /tmp/lapsam-ci-dockerd.pid), its log in $LOG;
# DOCKERD_ARGS adds options to dockerd (e.g. another -H socket and --data-root; note that
# --bridge=none makes dockerd delete an existing docker0 bridge, breaking another engine).
set -euo pipefail

STATE="${LAPSAM_DOCKERD_STATE:-/tmp/lapsam-ci-dockerd.pid}"
LOG="${LAPSAM_DOCKERD_LOG:-/tmp/lapsam-ci-dockerd.log}"
WAIT_S="${LAPSAM_DOCKERD_WAIT_S:-90}"

say() { echo "docker.sh: $*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        say "need root for: $*" >&2; return 1; fi
}

engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

install_missing() {
    local pkgs=()
    command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || pkgs+=(debootstrap)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        say "installing ${pkgs[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    fi
}

start() {
    install_missing
    if engine_answers; then
        say "a Docker engine already answers; using it"
        return 0
    fi
    local dockerd_bin
    dockerd_bin="$(command -v dockerd || echo /usr/sbin/dockerd)"
    say "starting $dockerd_bin (log: $LOG)"
    # dockerd writes its own pid to --pidfile: that pid is the one `stop` signals.
    rm -f "$STATE"
    # shellcheck disable=SC2086 # DOCKERD_ARGS: extra options, word-split on purpose
    as_root nohup "$dockerd_bin" --pidfile "$STATE" ${DOCKERD_ARGS:-} >"$LOG" 2>&1 < /dev/null &
    local launcher=$!
    for _ in $(seq 1 20); do [ -s "$STATE" ] && break; kill -0 "$launcher" 2>/dev/null || break; sleep 0.5; done
    local waited=0
    until engine_answers; do
        if ! kill -0 "$(cat "$STATE" 2>/dev/null || echo "$launcher")" 2>/dev/null; then
            say "dockerd exited; last lines of $LOG:" >&2
            tail -n 30 "$LOG" >&2 || true
            rm -f "$STATE"
            return 1
        fi
        if [ "$waited" -ge "$WAIT_S" ]; then
            say "no answer from dockerd after ${WAIT_S} s; last lines of $LOG:" >&2
            tail -n 30 "$LOG" >&2 || true
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "engine up after ${waited} s: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
}

stop() {
    if [ ! -f "$STATE" ]; then
        say "no dockerd was started by docker.sh start; nothing to stop"
        return 0
    fi
    local pid
    pid="$(cat "$STATE")"
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping dockerd (pid $pid)"
        as_root kill -TERM "$pid" || true
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd did not stop in 30 s; killing it"
            as_root kill -KILL "$pid" || true
        fi
    fi
    rm -f "$STATE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
