"""Device identity on the server side: the per-federation client registry, the verifiers' key cache,
enrollment tokens. Nothing here is imported by the edge SDK (``clients/``)."""

from services.identity.enrollment import Enrolled, Enrollment, EnrollmentError, EnrollmentToken
from services.identity.keys import FederationKeys
from services.identity.registry import ClientRecord, ClientRegistry

__all__ = [
    "ClientRecord",
    "ClientRegistry",
    "Enrolled",
    "Enrollment",
    "EnrollmentError",
    "EnrollmentToken",
    "FederationKeys",
]
