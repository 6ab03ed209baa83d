#!/usr/bin/env bash
# Split CuTeDSL's big part (.gpu-big/cutlass_cu13.tar.xz, from ../shared/tools/pack-gpu-wheels.sh) in two
# halves, .gpu-big/cutpart_00 and .gpu-big2/cutpart_01: the whole file (~61 MiB) plus the working tree went
# over the device tool's 64 MiB per call once the tree passed ~3 MiB. Two calls within ~30 s (warm machine):
#   1) carry [".gpu-big"]:                      mkdir -p /tmp/cutpart && cp .gpu-big/cutpart_00 /tmp/cutpart/
#   2) carry [".gpu-big2", ".whl", ".whl-base"]: mkdir -p /tmp/cut && cat /tmp/cutpart/cutpart_00 .gpu-big2/cutpart_01 \
#        | xz -dc | tar xf - -C /tmp/cut && bash benchmarks/gpu/session.sh <parts>
set -euo pipefail
cd "$(dirname "$0")/../.."
src=.gpu-big/cutlass_cu13.tar.xz
[ -f "$src" ] || { echo "no $src: run ../shared/tools/pack-gpu-wheels.sh first" >&2; exit 1; }
mkdir -p .gpu-big2
grep -qx '/.gpu-big2/' .git/info/exclude 2>/dev/null || echo '/.gpu-big2/' >> .git/info/exclude
split -n 2 -d "$src" /tmp/cutpart_
mv /tmp/cutpart_00 .gpu-big/cutpart_00 && mv /tmp/cutpart_01 .gpu-big2/cutpart_01 && rm "$src"
ls -la .gpu-big .gpu-big2
