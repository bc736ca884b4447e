"""lapsam.distill."""
