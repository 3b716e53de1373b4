"""The Redis layout of PFI: federation specs, versioned global adapters, offsets, stats, client keys."""
