"""nanoserve: a small vLLM-style LLM inference server.

The offline API lives here: ``from nanoserve import LLM, SamplingParams``. The services are
``scheduler_service`` and ``worker_service``; ``python -m nanoserve`` is the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanoserve.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; import it only when asked for.
    if name == "LLM":
        from nanoserve.llm import LLM

        return LLM
    raise AttributeError(name)
