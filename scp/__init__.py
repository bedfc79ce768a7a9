"""DIMSE edge of the archive (pynetdicom)."""
