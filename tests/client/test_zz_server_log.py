"""Runs last (pytest takes files in name order): the shared cluster's server log, after the
whole client suite ran against it, holds no internal error (SQLSTATE XX000) and no Rust
backtrace. Every error the suite provokes on purpose must carry a SQLSTATE of its own."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

LOG = Path("/tmp/chat_backfill_pytest/server.log")


@pytest.mark.skipif(bool(os.environ.get("PGHOST")), reason="the cluster is not the suite's own: its log is elsewhere")
def test_the_suites_server_log_has_no_internal_error(cluster):
    text = LOG.read_text(errors="replace")
    bad = [line for line in text.splitlines() if re.search(r"\] XX000 |backtrace", line, re.IGNORECASE)]
    assert re.search(r"\] [0-9A-Z]{5} ", text), "log lines carry their SQLSTATE (scripts/cluster.sh log_line_prefix)"
    assert bad == [], "\n".join(bad[:20])
