"""/api/v1/pipelines: a submission of tasks that wait for tasks, as a graph with each step's state."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam

from mloc.api.deps import Caller, Orch
from mloc.api.responses import raises
from mloc.errors import NotFound
from mloc.orchestrator import pipelines

router = APIRouter(prefix="/api/v1/pipelines", tags=["pipelines"])
PipelineId = Annotated[str, PathParam(min_length=36, max_length=36, pattern=r"^[0-9a-f-]{36}$")]


@router.get("/{pipeline_id}")
@raises(NotFound)
async def show_pipeline(pipeline_id: PipelineId, orch: Orch, who: Caller) -> dict[str, Any]:
    """The pipeline's tasks in submission order, each with the ids it waits for and its state now."""
    return await pipelines.graph(orch.store, pipeline_id, who)


@router.post("/{pipeline_id}/cancel")
@raises(NotFound)
async def cancel_pipeline(pipeline_id: PipelineId, orch: Orch, who: Caller) -> dict[str, Any]:
    """Cancel every task of the pipeline that has not ended."""
    return await pipelines.cancel_pipeline(orch.store, pipeline_id, who)
