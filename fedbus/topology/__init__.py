"""fedbus.topology (see DESIGN.md section 2)."""
