#!/usr/bin/env bash
# Compiles what deploy/Dockerfile's build stage copies into the image, and
# nothing else, without a Docker engine: a file the build needs that the
# Dockerfile leaves out (build.rs, a directory an include_str! reads) fails
# here, in CI, rather than in an image build. Like the image build, the
# context has no .git (.dockerignore), so the binary's commit is the one
# NUDGE_COMMIT gives, else `unknown`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

# The build stage: from the first FROM to the second; its COPY lines
# without --from, each `COPY SRC... DEST` with DEST under WORKDIR /src.
copies=$(awk '/^FROM /{ stage++ } stage == 1 && /^COPY / && !/--from/' "$root/deploy/Dockerfile")
[ -n "$copies" ] || { echo "no COPY in the Dockerfile's build stage" >&2; exit 1; }
while read -r _ line; do
    read -r -a parts <<<"$line"
    dest=${parts[-1]}
    for source in "${parts[@]:0:${#parts[@]}-1}"; do
        case $dest in
            ./ | . ) target=$context/$source ;;
            ./*) target=$context/${dest#./} ;;
            *) echo "unexpected COPY destination $dest" >&2; exit 1 ;;
        esac
        mkdir -p "$(dirname "$target")"
        (cd "$root" && cp -r "$source" "$target")
    done
done <<<"$copies"

# The dependencies' check artifacts of `cargo clippy` are reused; only
# nudge itself is compiled again.
# NUDGE_COMMIT unset: set, it would stand in for the build script's.
env -u NUDGE_COMMIT CARGO_TARGET_DIR="$root/target" cargo check --locked --quiet \
    --manifest-path "$context/Cargo.toml" --bin nudge
echo "ok: the Dockerfile's build stage copies everything the build reads"
