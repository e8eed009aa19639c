//! The `outboxd` binary: everything it does is in the library
//! (`outboxd::commands`); this maps the result to an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    match outboxd::commands::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            err.report();
            ExitCode::from(err.exit_code())
        }
    }
}
