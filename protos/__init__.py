"""The contract between the scheduler and the workers, and what both services share.

``protos/`` holds the .proto files of both gRPC services and, once ``make protos`` ran, their
generated stubs (``protos.nanoserve.v1``, ``protos.nanoserve.worker.v1``); beside them, the step
protocol's domain objects (step_plan.py, sampling_params.py), their wire conversion
(wire_worker.py), the worker link's shared-secret check (auth.py), the step trace both sides write
(step_trace.py) and the environment-variable defaults of every flag (envargs.py).

Imports run one way: ``scheduler_service`` and ``worker_service`` import this package; it imports
neither of them, nor ``nanoserve``, ``models``, ``kernels`` or torch.
"""
