"""`--pool-warn/--pool-high/--pool-low` (env FLYIO_POOL_*_PERCENT): the pool's usage policy,
as setup-pool, gc, monitor and daemon take it (devices/policy.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from devices.policy import ENV_HIGH, ENV_LOW, ENV_WARN, UsagePolicy, policy_from


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds pool_warn, pool_high, pool_low (percent strings or None) to the command."""
    for option in reversed([
        click.option("--pool-warn", default=None, help=f"Warn at this data/metadata usage, percent (env {ENV_WARN}; 80)."),
        click.option("--pool-high", default=None, help=f"Evict from this data usage, percent (env {ENV_HIGH}; 85)."),
        click.option("--pool-low", default=None, help=f"Evict down to below this data usage, percent (env {ENV_LOW}; 75)."),
    ]):
        fn = option(fn)
    return fn


def policy_of(pool_warn: str | None, pool_high: str | None, pool_low: str | None) -> UsagePolicy:
    return policy_from(pool_warn, pool_high, pool_low)
