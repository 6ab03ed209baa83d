"""forge's gates: an engine is trusted because it passed them.

- probe.py, case.py, case_data.py: the probe contract and the case format (random or corpus batches);
- stacks/: reference stacks (STACKS), run as subprocesses through the contract;
- policies.py: tolerance policies (bitwise, per-dtype bounds); report.py: GateReport;
- launch.py: engine discovery, sandboxes, subprocesses under a deadline; checks.py: contract checks
  on engine outputs; context.py: what every gate does the same way;
- m1_forward.py .. m6_checkpoint.py: one module per stage-1 gate; runner.py: GATES, GateOptions,
  run_gate, run_all;
- ops/: stage 2's per-op harness (a candidate checked against the op's reference and timed in a child
  process, leaderboards).
"""
