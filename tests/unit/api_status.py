"""The HTTP status a client sees for an error the VMM raises, for the tests that call the VMM
directly and pin that status."""

from __future__ import annotations

from pych.api.http import domain_error_status  # LEAD(merge): the API's table, pych/api/errors.py
from pych.errors import VmmError


def api_status(error: VmmError) -> int:
    return int(domain_error_status(error))
