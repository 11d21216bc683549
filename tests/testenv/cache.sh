# Sourced by build.sh and build-tools.sh: a binary cache keyed by a hash of
# everything that affects the binaries, in
# ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla/testenv/<key>/, hard-linked into $out.
# The caller sets `bins`, `out` and `say`, then calls `cache_init KEY MESSAGE`
# and `cache_reuse_or_lock` before building into "$cache".

# cache_key FILE...: a short hash over the files' names (relative to this
# directory, so every clone agrees) and contents.
cache_key() {
  for f in "$@"; do printf '\n==> %s\n' "${f#"$here"/}"; cat "$f"; done | sha256sum | cut -c1-32
}

# cache_init KEY MESSAGE: where the binaries live, and what to say once installed.
cache_init() {
  key=$1
  installed_message=$2
  cache_root="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/flotilla/testenv"
  cache="$cache_root/$key"
}

install_bins() {
  mkdir -p "$out"
  for b in "${bins[@]}"; do
    if [[ "$cache/$b" -ef "$out/$b" ]]; then continue; fi
    rm -f "$out/$b.tmp"
    ln "$cache/$b" "$out/$b.tmp" 2>/dev/null || cp "$cache/$b" "$out/$b.tmp"
    mv -f "$out/$b.tmp" "$out/$b"
  done
  say "$installed_message (cache key $key)"
}

have_cache() {
  for b in "${bins[@]}"; do [[ -x "$cache/$b" ]] || return 1; done
}

# Installs cached binaries and exits when they exist; otherwise takes the
# machine-wide build lock (one build at a time: a concurrent run waits, then
# reuses what the other built) and returns so the caller builds.
cache_reuse_or_lock() {
  if have_cache; then
    install_bins
    exit 0
  fi
  mkdir -p "$cache_root"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache_root/.lock"
    if ! flock -n 9; then
      say "another build is running; waiting for it"
      flock 9
    fi
    if have_cache; then
      install_bins
      exit 0
    fi
  fi
}
