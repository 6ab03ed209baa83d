#!/usr/bin/env bash
# One device call = one or more parts, each writing into $OUT/<part>/, then bundled into $OUT/<part>.tgz
# (the device tool brings back at most 8 files). Parts: see the case below (kernels, engine, gates, compare, ...).
#   bash benchmarks/gpu/session.sh kernels engine
# Carry [".whl", ".whl-base"]: wheels the GPU image lacks (pack-gpu-wheels.sh; datasets for the engine).
# FA4 / quack also need CuTeDSL's big part in /tmp/cut, unpacked by the same call from two halves carried by
# two calls (split_big_carry.sh says how: the whole file no longer fits one call beside the tree).
# They install under a path with a `site-packages` component: quack fingerprints its GEMM epilogues by
# source and treats functions from files under site-packages as library code; from any other path it
# recurses into CuTeDSL's internals and fails (quack-kernels 0.6.5: "no fail-closed semantic key").
set -uo pipefail
: "${OUT:?}"
cd "$(dirname "$0")/../.."
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
else SANDBOX_ARG="--sandbox preferred"; echo "bwrap does not run here ($(head -c 200 /tmp/bwrap_probe.txt)): gates unsandboxed"; fi
export FORGE_GIT_COMMIT="${FORGE_GIT_COMMIT:-unknown}"
for part in "$@"; do
  dir="$OUT/$part"; mkdir -p "$dir"; t0=$(date +%s)
  case "$part" in
    kernels) timeout 260 python3 exports/train_engine_0.5B/scripts/gpu_kernels.py --budget 220 --out "$dir" > "$dir/log.txt" 2>&1 ;;
    engine)  OUT="$dir" timeout 330 bash exports/train_engine_0.5B/scripts/gpu_check.sh > "$dir/log.txt" 2>&1 ;;
    gates)   OUT="$dir" timeout ${GATES_S:-300} bash benchmarks/gpu/gates_0.5b.sh > "$dir/log.txt" 2>&1 ;;
    compare) OUT="$dir" PART=compare BUDGET_S=${BUDGET_S:-300} STACKS=${STACKS:-} timeout 360 bash benchmarks/gpu/compare_0.5b.sh > "$dir/log.txt" 2>&1 ;;
    variants)  # engine bench variants beyond its default (compile + SDPA + Triton AdamW)
      e="python3 -m train_engine_0_5b bench --seq-length 4096 --steps 8 --warmup 3"
      triton_all="rms_norm=triton_fused,add_rms_norm=triton_fused,rope=triton_fused,swiglu=triton_fused,cross_entropy=triton_fused,adamw=triton_fused,gemm=concat"
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { timeout 150 $e --micro-batch-size 8 --no-compile --ops "$triton_all" --json "$dir/eager_triton_mb8.json"
        timeout 150 $e --micro-batch-size 8 --no-compile --json "$dir/eager_default_mb8.json"
        timeout 200 $e --micro-batch-size 12 --compile --json "$dir/compile_mb12.json"; } > "$dir/log.txt" 2>&1 ;;
    attention)  # FA4 op tests on the real kernel, the attention table, and the compiled engine step with each
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      e="python3 -m train_engine_0_5b bench --seq-length 4096 --steps 8 --warmup 3 --micro-batch-size 8 --compile"
      { timeout 240 python3 -m pytest -q -p no:cacheprovider exports/train_engine_0.5B/tests/ops/test_attention_flash4.py exports/train_engine_0.5B/tests/ops/test_attention_sdpa.py
        timeout 150 python3 exports/train_engine_0.5B/scripts/gpu_attention.py --out "$dir"
        timeout 200 $e --ops attention=flash4 ${BENCH_EXTRA:-} --json "$dir/compile_flash4_mb8.json"
        timeout 200 $e --ops attention=sdpa ${BENCH_EXTRA:-} --json "$dir/compile_sdpa_mb8.json"; } > "$dir/log.txt" 2>&1 ;;
    mlp)  # ops.mlp=quack_gated: its tests on the real kernel, the compiled step with it and unfused, the MLP table
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      e="python3 -m train_engine_0_5b bench --seq-length 4096 --steps 8 --warmup 3 --micro-batch-size 8 --compile"
      { timeout 240 python3 -m pytest -q -p no:cacheprovider exports/train_engine_0.5B/tests/ops/test_mlp_quack.py \
          exports/train_engine_0.5B/tests/ops/test_dswiglu_triton.py exports/train_engine_0.5B/tests/test_trainer_direct_grads.py exports/train_engine_0.5B/tests/ops/test_adamw_triton.py
        timeout 200 $e --ops mlp=quack_gated ${BENCH_EXTRA:-} --json "$dir/compile_quack_gated_mb8.json"
        timeout 200 $e --ops mlp=unfused ${BENCH_EXTRA:-} --json "$dir/compile_unfused_mb8.json"
        timeout ${MLP_TABLE_S:-150} python3 exports/train_engine_0.5B/scripts/gpu_mlp.py --out "$dir"; } > "$dir/log.txt" 2>&1 ;;
    graph)  # --cuda-graph: graph_check.sh (its GPU test per op variant, the graphed step), then the step without it
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { OUT="$dir" bash benchmarks/gpu/graph_check.sh
        timeout 200 python3 -m train_engine_0_5b bench --seq-length 4096 --steps 8 --warmup 3 --micro-batch-size ${MBS:-8} \
          --compile --no-cuda-graph ${BENCH_EXTRA:-} --json "$dir/compile_no_graph_mb${MBS:-8}.json"; } > "$dir/log.txt" 2>&1 ;;
    ab)  # the compiled step (graphed where it can be) per op choice, ROUNDS alternations:
         # AB="name:ops;name:ops:VAR=value VAR2=value" (empty ops: the defaults; VARs: that run's environment,
         # e.g. Inductor's TORCHINDUCTOR_* switches); AB_CODE=1: the first run also dumps Inductor's code;
         # a variant named fa4_* runs through bench_fa4_launch.py with FA4 forward options $FA4_LAUNCH
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      a="--seq-length 4096 --steps ${AB_STEPS:-8} --warmup 3 --micro-batch-size ${MBS:-8} --compile"
      IFS=';' read -ra abs <<< "${AB:?AB=name:ops[:VAR=value ...];...}"
      { for r in $(seq "${ROUNDS:-1}"); do for v in "${abs[@]}"; do IFS=':' read -r n o vars <<< "$v"
          run=(python3 -m train_engine_0_5b bench)
          [[ "$n" == fa4_* ]] && run=(python3 benchmarks/gpu/bench_fa4_launch.py "${FA4_LAUNCH:?}")
          cmd=(env $vars "${run[@]}" $a ${o:+--ops "$o"} --json "$dir/${n}_r$r.json")
          if [ "${AB_CODE:-0}" = 1 ] && [ ! -f "$dir/output_code.txt" ]; then
            TORCH_LOGS=output_code timeout 240 "${cmd[@]}" 2> "$dir/output_code.txt"
          else timeout ${AB_TIMEOUT:-200} "${cmd[@]}"; fi
          echo "[ab] $n round $r: exit $?"; grep -h '"tokens_per_s"' "$dir/${n}_r$r.json" 2>/dev/null | head -1; done; done
        if [ -f "$dir/output_code.txt" ]; then gzip "$dir/output_code.txt"; fi; } > "$dir/log.txt" 2>&1 ;;
    lce)  # linear_cross_entropy=triton_fused: its op tests on the real kernels, the launch / chunk table, its graph test
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { timeout 200 python3 -m pytest -q -p no:cacheprovider exports/train_engine_0.5B/tests/ops/test_cross_entropy_triton.py
        timeout ${LCE_S:-200} python3 exports/train_engine_0.5B/scripts/gpu_linear_ce.py --out "$dir" ${LCE_ARGS:-}
        OUT="$dir" BENCH=0 SANITIZE=0 VARIANTS=linear-ce timeout 150 bash benchmarks/gpu/graph_check.sh; } > "$dir/log.txt" 2>&1 ;;
    qkvrope)  # qkv_rope=triton_fused: its op tests on the real kernel, the registry tests, its CUDA-graph test
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { timeout 240 python3 -m pytest -q -p no:cacheprovider exports/train_engine_0.5B/tests/ops/test_qkv_rope_triton.py \
          exports/train_engine_0.5B/tests/test_engine_registry.py
        OUT="$dir" BENCH=0 SANITIZE=0 VARIANTS=qkv-rope timeout 150 bash benchmarks/gpu/graph_check.sh; } > "$dir/log.txt" 2>&1 ;;
    quackops)  # mlp=quack_dgated and linear_cross_entropy=quack_triton: their op tests on the real kernels, their graph tests
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { timeout 300 python3 -m pytest -q -p no:cacheprovider exports/train_engine_0.5B/tests/ops/test_mlp_quack.py \
          exports/train_engine_0.5B/tests/ops/test_linear_ce_quack_triton.py exports/train_engine_0.5B/tests/test_engine_registry.py
        OUT="$dir" BENCH=0 SANITIZE=0 VARIANTS="${VARIANTS:-quack-dgated linear-ce-quack}" timeout 200 bash benchmarks/gpu/graph_check.sh; } > "$dir/log.txt" 2>&1 ;;
    lcegemms)  # the fused output layer + CE per GEMM mode (cublas / quack / quack_lse), and its quack op tests
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { timeout 240 python3 -m pytest -q -p no:cacheprovider exports/train_engine_0.5B/tests/ops/test_linear_ce_quack_triton.py \
          exports/train_engine_0.5B/tests/ops/test_cross_entropy_triton.py
        timeout 200 python3 benchmarks/gpu/linear_ce_gemms.py --out "$dir" ${LCE_GEMMS_ARGS:-}; } > "$dir/log.txt" 2>&1 ;;
    trace)  # the default compiled step's op table plus its ordered kernel timeline (step_trace.py)
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      timeout 300 python3 benchmarks/gpu/step_trace.py --trace "$dir/trace.json.gz" --seq-length 4096 --steps 8 --warmup 3 \
        --micro-batch-size ${MBS:-8} --compile --op-table ${BENCH_EXTRA:-} --json "$dir/optable_mb${MBS:-8}.json" > "$dir/log.txt" 2>&1 ;;
    gemms)  # per-site GEMM election: cuBLAS vs quack (heuristic and pinned SM90 configs), and the fc2 dgrad with dSwiGLU
            # in its epilogue; GEMM_ARGS is parsed as shell words (e.g. GEMM_ARGS="--sites o.fwd,o.dgrad --configs 0:4")
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      eval "extra=(${GEMM_ARGS:-})"
      timeout ${GEMM_S:-480} python3 benchmarks/gpu/gemm_election.py --out "$dir" "${extra[@]}" > "$dir/log.txt" 2>&1 ;;
    wgrad)  # weight-gradient GEMMs with a bf16 vs an fp32 output at the step's shapes
      timeout 120 python3 benchmarks/gpu/wgrad_out_dtype.py --out "$dir" > "$dir/log.txt" 2>&1 ;;
    fa4fwd)  # FA4 forward launch options at the step's attention shape
      timeout ${FA4_S:-200} python3 benchmarks/gpu/fa4_fwd_configs.py --out "$dir" > "$dir/log.txt" 2>&1 ;;
    fa4bwd)  # FA4's SM90 backward tile configurations and the K/V-expanded (MHA) backward at the step's shape;
             # FA4_ARGS is parsed as shell words, so variant names keep their spaces: FA4_ARGS='--only "gqa default"'
      eval "extra=(${FA4_ARGS:-})"
      timeout ${FA4_S:-300} python3 benchmarks/gpu/fa4_bwd_configs.py --out "$dir" "${extra[@]}" > "$dir/log.txt" 2>&1 ;;
    graphpre)  # pretrain --cuda-graph end to end: stop + checkpoint + resume vs straight vs no graph
      OUT="$dir" timeout ${GRAPHPRE_S:-560} bash benchmarks/gpu/graph_pretrain.sh > "$dir/log.txt" 2>&1 ;;
    graphtest)  # graph_check.sh's per-variant GPU tests alone (VARIANTS), no bench
      OUT="$dir" BENCH=0 timeout ${GRAPHTEST_S:-400} bash benchmarks/gpu/graph_check.sh > "$dir/log.txt" 2>&1 ;;
    optable)  # the engine's default compiled step with the per-op table and the profiler breakdown
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      timeout 400 python3 -m train_engine_0_5b bench --seq-length 4096 --steps 8 --warmup 3 --micro-batch-size ${MBS:-8} \
        --compile --op-table ${BENCH_EXTRA:-} --json "$dir/optable_mb${MBS:-8}.json" > "$dir/log.txt" 2>&1 ;;
    stage)  # gates on one GPU as the loop runs them (gate_stage.py): GATES, their SEQ, timeout STAGE_S for all of them
      timeout ${STAGE_S:-540} python3 -m benchmarks.gpu.gate_stage --engine exports/train_engine_0.5B --gates "${GATES:-m1,m2,m3,m7}" \
        --out "$dir" --seq-length "${SEQ:-2048}" --timeout "${GATE_S:-300}" $SANDBOX_ARG > "$dir/log.txt" 2>&1 ;;
    m5)  # the engine's bench at micro batch 8, then M5: the loss part and pretrain at its defaults on the gate's clock
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      { timeout 150 python3 -m train_engine_0_5b bench --seq-length 4096 --micro-batch-size 8 --steps 10 --json "$dir/bench_mb8.json"
        echo "[m5] bench exit $?"
        timeout ${M5_S:-450} python3 -m benchmarks.gpu.gate_stage --engine exports/train_engine_0.5B --gates m5 --out "$dir" \
          --speed-steps "${SPEED_STEPS:-10}" --speed-global-batch-size "${SPEED_GB:-64}" --speed-micro-batch-size 8 \
          --long-train-steps "${LT:-20}" --timeout "${M5_GATE_S:-430}" $SANDBOX_ARG ${M5_ARGS:-}; } > "$dir/log.txt" 2>&1 ;;
    fa4cache)  # FA4's persistent kernel cache in two processes: loaded, and bitwise the same results
      export PYTHONPATH="$PWD/exports/train_engine_0.5B/src:$PYTHONPATH"
      timeout 200 python3 benchmarks/gpu/fa4_cache_check.py --out "$dir" > "$dir/log.txt" 2>&1 ;;
    agreement)  # torch vs megatron stacks: bf16 probes and the fp32 steps probe
      OUT="$dir" PART=agreement BUDGET_S=${BUDGET_S:-330} timeout 360 bash benchmarks/gpu/compare_0.5b.sh > "$dir/log.txt" 2>&1 ;;
    tune)  # stage 2's tune search per Triton op at the 0.5B's shapes (tune_ops.py): leaderboards, summary.md, tuned values;
           # TUNE_ARGS is parsed as shell words (e.g. TUNE_ARGS="--ops rms_norm,swiglu --max-trials 12")
      eval "extra=(${TUNE_ARGS:-})"
      timeout ${TUNE_S:-290} python3 -m benchmarks.gpu.tune_ops --out "$dir" --budget-s ${TUNE_BUDGET_S:-260} "${extra[@]}" > "$dir/log.txt" 2>&1 ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "[$part] exit $? in $(( $(date +%s) - t0 ))s"; tail -n 25 "$dir/log.txt"
  tar czf "$OUT/$part.tgz" -C "$OUT" "$part" && rm -rf "$dir"
done
ls -la "$OUT"
