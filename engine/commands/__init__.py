"""One module per `lora-lab` subcommand family. Each defines `register(subparsers)`, adding its parsers with
`set_defaults(func=handler)`; a handler takes the parsed args and returns an exit code. `engine.cli` finds every
module here, so adding a subcommand touches no shared file."""
