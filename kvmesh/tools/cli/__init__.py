"""The `kvmesh` command: one subcommand per service and tool."""
