"""`--backend auto|devicemapper|blockfile`: which pool this host gets, said out loud."""

from __future__ import annotations

import os
from pathlib import Path

from devices.base import PoolConfig, ThinPool
from devices.dmsetup import driver_answers
from support.errors import ManagerError
from support.log import get_logger

log = get_logger("devices.select", component="pool-manager")

BACKENDS = ("auto", "devicemapper", "blockfile")
ENV_DATA_BLOCK_SIZE = "FLYIO_POOL_DATA_BLOCK_SIZE"


def data_block_bytes_from(text: str | None) -> int | None:
    """`--data-block-size` / FLYIO_POOL_DATA_BLOCK_SIZE in bytes (None: not set), checked
    against dm-thin's bounds so a bad value is a one-line error before anything is touched."""
    if not text:
        return None
    from devices.devicemapper import data_block_sectors
    from support.sizes import parse_size

    size = parse_size(text)
    data_block_sectors(size)
    return size


def device_mapper_available() -> tuple[bool, str]:
    """Whether /dev/mapper/control answers (`dmsetup version` reaches the kernel driver)."""
    if not Path("/dev/mapper/control").exists():
        return False, "no /dev/mapper/control"
    return driver_answers()


def open_pool(state_dir: Path, backend: str = "auto", config: PoolConfig | None = None, *,
              say: bool = True) -> ThinPool:
    """The pool backend for `state_dir`; `auto` picks devicemapper where the kernel has it.
    `say=False`: the choice is not logged (a look at the backend's limits, before the
    command opens the pool for real and says what it picked)."""
    if backend not in BACKENDS:
        raise ManagerError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    config = config or PoolConfig(directory=str(state_dir),
                                  data_block_bytes=data_block_bytes_from(os.environ.get(ENV_DATA_BLOCK_SIZE)))
    chosen, reason = backend, "requested"
    if backend == "auto":
        available, why = device_mapper_available()
        chosen, reason = ("devicemapper", why) if available else ("blockfile", why)
    if say:
        log.info("backend selected", backend=chosen, reason=reason)
    if chosen == "devicemapper":
        from devices.devicemapper import DevicemapperPool

        return DevicemapperPool(config)
    from devices.blockfile import BlockfilePool

    return BlockfilePool(config)
