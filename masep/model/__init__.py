from masep.model.moe_transformer import (  # noqa: F401
    Attention, Block, Experts, KVCache, MoE, MoETransformer, Routing, analytic_parameter_count,
    build_model, combine, compute_weight, dispatch_combine, dispatch_combine_static, drop_weight_copy,
    expert_capacity, init_weights, lm_loss_sum, route, routed_positions, sort_by_expert,
)
