"""lapsam.eval."""
