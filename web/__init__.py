"""HTTP edge of the archive (aiohttp): DICOMweb, health, and pages."""
