#!/usr/bin/env bash
# Vendor the browser client's third-party ES modules (app/web/vendor) from their npm packages, pinned.
# `make vendor` runs it; the files are committed, so `make run` needs no npm. To upgrade: change a version
# below, run `make vendor`, run the browser tests (tests/test_web_*.py), commit.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=app/web/vendor
# package@version  file inside the package  name in app/web/vendor (every package/LICENSE* file goes along)
PACKAGES=(
  "marked@18.2.1 package/lib/marked.esm.js marked.esm.js"
  "dompurify@3.4.18 package/dist/purify.es.mjs purify.es.mjs"
)
command -v npm >/dev/null || { echo "npm is needed to vendor (apt-get install -y npm)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$DEST"
{
  echo "# Vendored by \`make vendor\` (tools/vendor_web.sh) from npm; do not edit"
  echo
  echo "| package | file | sha256 |"
  echo "|---|---|---|"
} > "$tmp/README.md"
for entry in "${PACKAGES[@]}"; do
  read -r spec file name <<<"$entry"
  package=${spec%@*}
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null)   # npm checks the tarball against the registry's integrity
  mkdir -p "$tmp/$package"
  tar -xzf "$tmp/${package}-${spec##*@}.tgz" -C "$tmp/$package"
  # The source maps are not shipped: drop the comment pointing at them (a 404 in the browser's console).
  sed '/^\/\/# sourceMappingURL=/d' "$tmp/$package/$file" > "$DEST/$name"
  for license in "$tmp/$package"/package/LICENSE*; do   # LICENSE, and LICENSE-MPL for a dual license
    cp "$license" "$DEST/$package.$(basename "$license")"
  done
  echo "| $spec | $name | $(sha256sum "$DEST/$name" | cut -d' ' -f1) |" >> "$tmp/README.md"
done
cp "$tmp/README.md" "$DEST/README.md"
echo "vendored into $DEST:"; cat "$DEST/README.md"
