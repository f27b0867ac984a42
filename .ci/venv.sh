# Sourced by .ci/run and .ci/demo: the repository's .venv, made if missing, activated.
# On Debian a python3 without ensurepip gets python3-venv (as root, else through sudo).

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

use_venv() {
    if [ ! -x .venv/bin/pip ]; then   # a venv made without ensurepip has python but no pip: make it again
        if ! python3 -c "import ensurepip" 2>/dev/null; then
            as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv
        fi
        python3 -m venv --clear .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
}
