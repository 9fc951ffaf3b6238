"""Ed25519 signatures on envelopes: each site and the server hold a private key; peers hold public keys."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.protocol.errors import ProtocolError

SIGNATURE_BYTES = 64


class SignatureError(ProtocolError):
    """Unsigned where a signature is required, an unknown signer, or a signature that does not verify."""


class Signer:
    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def generate(cls) -> "Signer":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "Signer":
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key; create one with `fedge keys NAME`")
        return cls(key)

    def save(self, private_path: str | Path, public_path: str | Path) -> None:
        Path(private_path).write_bytes(self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        Path(private_path).chmod(0o600)
        Path(public_path).write_bytes(self.public_pem())

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class Verifier:
    """Public keys by sender name; an unknown sender or a bad signature is a ProtocolError."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]):
        self._keys = dict(keys)

    @classmethod
    def from_pems(cls, pems: Mapping[str, bytes]) -> "Verifier":
        keys = {}
        for name, pem in pems.items():
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"public key for {name!r} is not Ed25519")
            keys[name] = key
        return cls(keys)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Verifier":
        """Every `<sender>.pub` in the folder."""
        return cls.from_pems({p.stem: p.read_bytes() for p in sorted(Path(folder).glob("*.pub"))})

    def verify(self, sender: str, data: bytes, signature: bytes) -> None:
        key = self._keys.get(sender)
        if key is None:
            raise SignatureError(f"no public key for sender {sender!r}")
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise SignatureError(f"bad signature from {sender!r}") from None
