"""residual_scale, reference: no op of its own. add_rms_norm multiplies the attention / MLP output by r
(h = x + y * r); the model calls no residual_scale (ops.residual_scale is None).

Its cost: backward needs dy = dh * r before the out-projection's two GEMMs (dgrad and wgrad), one
elementwise pass over a (tokens, hidden) tensor per sublayer that no GEMM absorbs (Inductor's
`triton_poi_fused_mul_view_2`, two per layer; benchmarks/results/engine-0.5b-graphfix-ab-2026-11-23-h100/).
"""

residual_scale = None
