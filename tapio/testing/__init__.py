"""tapio testing."""
