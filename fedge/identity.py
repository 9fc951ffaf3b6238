"""Who a certificate says it is: the common name the federation CA wrote into it (`fedge provision`).

The broker takes that name as the MQTT username and client id (use_identity_as_username,
use_username_as_clientid), so the server and the agents use it as their client id too.
No torch here: the CLI imports this before anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path


def certificate_identity(cert_path: str | os.PathLike[str]) -> str:
    """The subject common name (CN) of a PEM certificate; ValueError, naming the file, when it cannot
    be read or has no single CN that is a valid fedge name."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fedge.protocol.topics import check_name

    path = Path(cert_path)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate ({exc}); use the .crt from a `fedge provision` kit") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(f"certificate {path} has {len(names)} common names; a fedge identity has exactly one")
    value = names[0].value
    name = value.decode() if isinstance(value, bytes) else value
    try:
        return check_name("certificate identity", name)
    except ValueError as exc:
        raise ValueError(f"certificate {path}: {exc}") from None
