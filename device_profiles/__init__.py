"""Device profiles: one YAML file per device class (spec sheet, site link, agent defaults), the
schema and loader, and detection of the device we run on. Importing this package loads no torch;
the roofline estimate lives in `device_profiles.roofline`."""

from device_profiles.loader import ProfileError, ProfileNotFoundError, load_profile, load_profile_file, resolve_profile_path, shipped_names
from device_profiles.schema import SCHEMA_VERSION, Defaults, Device, Link, Profile

__all__ = [
    "SCHEMA_VERSION",
    "Defaults",
    "Device",
    "Link",
    "Profile",
    "ProfileError",
    "ProfileNotFoundError",
    "load_profile",
    "load_profile_file",
    "resolve_profile_path",
    "shipped_names",
]
