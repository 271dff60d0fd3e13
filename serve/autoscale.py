"""Autoscaling on the load that arrives, not on the requests a replica holds.

Ray Serve's default policy scales on ongoing requests per replica; a replica that sheds load answers refusals at
once, so at saturation it holds 1-2 requests against a target of 8 and no replica is ever added. Here each model
replica reports `demand` (serve/app.py, StudentModel.record_autoscaling_stats): the seconds its forward thread was
busy per second, plus the seconds the items it refused would have taken (at its measured cost per item in full
batches). 1.0 is one replica's worth of work; under 4x overload a lone replica reports about 4. The policy asks
for sum(demand) / target_utilisation replicas; Ray Serve applies min/max_replicas and the up/downscale delays.

Ray Serve pickles this module's policy by value into its controller, so it imports nothing from the project.
"""
from __future__ import annotations

DEMAND = "demand"


class DemandPolicy:
    """`policy_function` of serve.autoscaling (metric: demand); policy_kwargs: target_utilisation."""

    def __init__(self, target_utilisation: float = 0.7):
        self.target = target_utilisation

    def __call__(self, ctx):
        demand = (ctx.aggregated_metrics or {}).get(DEMAND) or {}
        if not demand:  # no replica has reported yet: keep what Serve aims for
            return ctx.target_num_replicas, {}
        return sum(demand.values()) / self.target, {}


def demand(busy_s: float, refused_items: int, cost_per_item_s: float, elapsed_s: float) -> float:
    """A replica's demand over `elapsed_s`: forward-thread seconds busy plus those the refused items would need."""
    return (busy_s + refused_items * cost_per_item_s) / max(elapsed_s, 1e-3)
