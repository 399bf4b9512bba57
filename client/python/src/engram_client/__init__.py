"""engram_client: Python client of Engram, named Dense Associative Memory
banks over gRPC (proto/engram/v1/engram.proto).

    import engram_client
    with engram_client.Client("127.0.0.1:50051", token=None) as c:
        c.create_bank("demo", 64, "continuous", energy="lse", beta=8.0)

Client is synchronous, AsyncClient (engram_client.aio) is its asyncio twin.
Failed calls raise EngramError subclasses (NotFound, InvalidArgument, ...).
Range and label_filter build the `filter=` of retrieve / energy / sample.
`pb` and `pb_grpc` are the generated engram.v1 modules, for requests the
client methods do not cover; the *_request functions build the same
messages the clients send.
"""
from ._convert import (backup_request, create_bank_request, delete_bank_request,
                       delete_patterns_request, energy_config, energy_request, get_bank_request,
                       get_patterns_request, label_filter, labels_message, list_banks_request,
                       retrieve_request, sample_request, store_request)
from ._gen.engram.v1 import engram_pb2 as pb
from ._gen.engram.v1 import engram_pb2_grpc as pb_grpc
from .aio import AsyncClient
from .client import Client
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, EngramError,
                     FailedPrecondition, Internal, InvalidArgument, NotFound, OutOfRange,
                     PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable,
                     Unimplemented, Unknown, error_from_rpc)
from .types import (BackupResult, BankInfo, Capacity, EnergyResult, EnergySpec, Memory, Patterns,
                    Range, RetrieveResult, Sample, SampleFrame, SampleResponse, TrajectoryPoint)

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "pb", "pb_grpc",
    "EnergySpec", "Range", "Capacity", "BankInfo", "Patterns", "Memory", "RetrieveResult",
    "EnergyResult", "TrajectoryPoint", "Sample", "SampleResponse", "SampleFrame",
    "BackupResult",
    "EngramError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
    "error_from_rpc",
    "energy_config", "create_bank_request", "get_bank_request", "list_banks_request",
    "delete_bank_request", "store_request", "get_patterns_request", "delete_patterns_request",
    "retrieve_request", "energy_request", "sample_request", "backup_request", "label_filter",
    "labels_message",
]
