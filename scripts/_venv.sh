# Sourced (from the repository root) by the scripts that set up .venv: start_tts.sh, test.sh,
# smoke_gpu.sh. Each says what it is doing; pip shows its own progress.

# step MESSAGE...: one progress line on stderr, prefixed with the calling script's name.
step() { printf '==> %s: %s\n' "${0##*/}" "$*" >&2; }

# make_venv: create .venv with $PYTHON (default python3) unless it exists.
make_venv() {
  if [ ! -x .venv/bin/python ]; then
    step "creating .venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv .venv
  fi
}

# venv_stamp NAME FILE...: the marker file that NAME was installed for these files' contents.
venv_stamp() {
  local name=$1
  shift
  echo ".venv/.installed-$name-$(cat "$@" | sha1sum | cut -c1-12)"
}

# pip_install WHAT ARGS...: say what is being installed, then pip install ARGS into .venv.
pip_install() {
  local what=$1
  shift
  step "installing $what"
  .venv/bin/python -m pip install --disable-pip-version-check "$@"
}
