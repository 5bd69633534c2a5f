from masep.model.moe_transformer import (  # noqa: F401
    Attention, Block, Experts, KVCache, MoE, MoETransformer, Routing, analytic_parameter_count,
    build_model, dispatch_combine, expert_capacity, init_weights, lm_loss_sum, route,
)
