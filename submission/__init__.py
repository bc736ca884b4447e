"""lapsam.submission."""
