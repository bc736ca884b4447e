"""lapsam.runtime."""
