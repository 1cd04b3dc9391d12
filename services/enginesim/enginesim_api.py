"""The `EngineSim` gRPC service: Generate runs one simulated request on the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from kvmesh.runtime.errors import guard
from kvmesh.v1 import enginesim_pb2, enginesim_pb2_grpc

if TYPE_CHECKING:
    from kvmesh.services.enginesim.service import EngineSimService


class EngineSimApi(enginesim_pb2_grpc.EngineSimServicer):
    def __init__(self, sim: EngineSimService) -> None:
        self.sim = sim

    @guard
    async def Generate(
        self, request: enginesim_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> enginesim_pb2.GenerateResponse:
        return await self.sim.generate(request)
