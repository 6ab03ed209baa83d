#!/usr/bin/env bash
# One device call = one or more parts, each writing into $OUT/<part>/, then bundled into $OUT/<part>.tgz
# (the device tool brings back at most 8 files). The parts and their typed options: benchmarks/gpu/session_parts.py,
# `python3 -m benchmarks.gpu.session --help` (any machine). This script sets up the GPU image, then runs it:
#   bash benchmarks/gpu/session.sh kernels engine
#   bash benchmarks/gpu/session.sh stage --gates m1,m7 -- ab --variant sdpa --ops attention=sdpa --variant fa4 --ops attention=flash4
# No part: the set-up alone (installs the carried wheels for a script run after it).
# Carry [".whl", ".whl-base"]: wheels the GPU image lacks (pack-gpu-wheels.sh; datasets for the engine).
# FA4 / quack also need CuTeDSL's big part in /tmp/cut, unpacked by the same call from two halves carried by
# two calls (split_big_carry.sh says how: the whole file no longer fits one call beside the tree).
# They install under a path with a `site-packages` component: quack fingerprints its GEMM epilogues by
# source and treats functions from files under site-packages as library code; from any other path it
# recurses into CuTeDSL's internals and fails (quack-kernels 0.6.5: "no fail-closed semantic key").
set -uo pipefail
cd "$(dirname "$0")/../.."
# The words are checked before the set-up: a typo, an unknown part or option runs nothing (--help: print, stop).
python3 -m benchmarks.gpu.session --check-only "$@" || exit
case " $* " in *" -h "*|*" --help "*) exit 0 ;; esac
: "${OUT:?}"
# Installed under /opt, not /tmp: the gates' sandbox shows the engine an empty /tmp.
wheels=$(ls .whl/*.whl .whl-base/*.whl 2>/dev/null)  # .whl-base is optional; a glob that matches nothing would stop pip
[ -d /opt/carried/site-packages ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /opt/carried/site-packages $wheels > /tmp/install.log 2>&1 || { echo "pip install reported errors"; tail -n 5 /tmp/install.log; }
export PYTHONPATH="/opt/carried/site-packages:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Gates scrub PYTHONPATH from the stacks they launch (isolation); a .pth file makes the carried wheels
# visible to every interpreter run there without it (appended after the image's own site-packages).
python3 -c "import site; open(site.getsitepackages()[0] + '/zz_forge_carried.pth', 'w').write('/opt/carried/site-packages\n')"
if [ -d /tmp/cut/nvidia_cutlass_dsl ]; then  # CuTeDSL's big part (FA4, quack), unpacked by an earlier call:
  cp -r /tmp/cut/nvidia_cutlass_dsl /opt/carried/site-packages/ 2>/dev/null  # see split_big_carry.sh
  export PYTHONPATH="$PYTHONPATH:/opt/carried/site-packages/nvidia_cutlass_dsl/dsl_packages"
  echo /opt/carried/site-packages/nvidia_cutlass_dsl/dsl_packages >> "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_forge_carried.pth"
fi
# bubblewrap for the gates' sandbox (the image lacks it): the carried .deb files, unpacked under /tmp; libcap
# goes next to the system's libraries only if the image lacks it (the gates start bwrap with a scrubbed env)
if ! command -v bwrap > /dev/null; then
  if [ ! -x /tmp/bw/usr/bin/bwrap ] && ls .whl/bubblewrap_*.deb > /dev/null 2>&1; then
    for f in .whl/bubblewrap_*.deb .whl/libcap2_*.deb; do dpkg -x "$f" /tmp/bw; done
    ldconfig -p | grep -q 'libcap.so.2 ' || cp -n /tmp/bw/lib/x86_64-linux-gnu/libcap.so.2* /usr/lib/x86_64-linux-gnu/
  fi
  export PATH="/tmp/bw/usr/bin:$PATH"
fi
if bwrap --ro-bind / / --dev /dev --proc /proc true 2> /tmp/bwrap_probe.txt; then SANDBOX_ARG=""
else SANDBOX_ARG="--gate-sandbox preferred"; echo "bwrap does not run here ($(head -c 200 /tmp/bwrap_probe.txt)): gates unsandboxed"; fi
export FORGE_GIT_COMMIT="${FORGE_GIT_COMMIT:-unknown}"
exec python3 -m benchmarks.gpu.session $SANDBOX_ARG "$@"
