#!/usr/bin/env bash
# Lines of Rust per crate (src/ and everything) and the ten largest source files, at a git
# revision (default HEAD): `scripts/loc-by-crate.sh c292779`.
set -euo pipefail
rev="${1:-HEAD}"
git ls-tree -r --name-only "$rev" | grep '\.rs$' | while read -r f; do
  printf '%s %s\n' "$(git show "$rev:$f" | wc -l)" "$f"
done > /tmp/loc.$$
awk '{split($2,p,"/"); c=p[1]; all[c]+=$1; if ($2 ~ "^[^/]+/src/") src[c]+=$1} END {for (c in all) printf "%-10s src %6d  all %6d\n", c, src[c], all[c]}' /tmp/loc.$$ | sort
echo "largest files:"; sort -rn /tmp/loc.$$ | head -10
rm -f /tmp/loc.$$
