"""lapsam.export."""
