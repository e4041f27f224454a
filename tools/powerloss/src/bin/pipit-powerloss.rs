//! Mounts the power-loss file system and takes commands on a Unix socket,
//! one line each (LazyFS takes them on a FIFO):
//!
//! ```text
//! cut                                    cut the power now; prints what was lost
//! pending                                what a cut now would lose
//! arm before|after OP NAME [SKIP] [PHASE]  cut at the (SKIP+1)-th OP on a file whose
//!                                        name contains NAME (`-`: any), optionally only
//!                                        while PHASE is open
//! marker PHASE FILE BEGIN END            PHASE opens at text BEGIN in FILE, closes at END
//! stats                                  operations counted, phases seen
//! unmount                                unmount and exit
//! ```
//!
//! OP is one of create, write, truncate, fsync, fsyncdir, rename, unlink,
//! mkdir, rmdir, link. After a cut every operation fails with EIO: kill
//! what uses the mount, `unmount`, and start again on the same backing
//! directory, which then holds what survived.
//!
//! ```sh
//! pipit-powerloss --backing /tmp/b --mount /tmp/m --control /tmp/pl.sock &
//! echo cut | socat - UNIX-CONNECT:/tmp/pl.sock
//! ```

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Parser;
use pipit_powerloss::{Control, Marker, Model, Op, Trigger};

#[derive(Parser)]
#[command(about = "A FUSE file system that loses what was not fsynced when told to cut the power")]
struct Args {
    /// Directory holding the files (its `tree/`) and the file system's own state.
    #[arg(long)]
    backing: PathBuf,
    /// Where to mount.
    #[arg(long)]
    mount: PathBuf,
    /// When directory entries become durable: strict, ext4-ordered or passthrough.
    #[arg(long, default_value = "strict")]
    model: String,
    /// The Unix socket that takes commands.
    #[arg(long)]
    control: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = Model::from_name(&args.model).with_context(|| format!("unknown model {}", args.model))?;
    let mounted = pipit_powerloss::mount(&args.backing, &args.mount, model)?;
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control).with_context(|| format!("binding {}", args.control.display()))?;
    println!(
        "mounted {} over {} (model {}), commands on {}",
        args.mount.display(),
        args.backing.display(),
        model.name(),
        args.control.display()
    );
    for conn in listener.incoming() {
        let conn = conn?;
        let mut out = conn.try_clone()?;
        for line in BufReader::new(conn).lines() {
            let line = line?;
            if line.trim() == "unmount" {
                mounted.unmount()?;
                let _ = std::fs::remove_file(&args.control);
                writeln!(out, "ok")?;
                return Ok(());
            }
            let answer = command(mounted.control(), &line).unwrap_or_else(|e| format!("error: {e:#}\n"));
            out.write_all(answer.as_bytes())?;
        }
    }
    Ok(())
}

fn op(name: &str) -> anyhow::Result<Op> {
    Op::ALL.into_iter().find(|o| o.name() == name).with_context(|| format!("unknown operation {name}"))
}

fn command(control: &Control, line: &str) -> anyhow::Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["cut"] => control.cut("control socket")?.to_string(),
        ["pending"] => control.pending().to_string(),
        ["stats"] => format!("{:?}\n", control.stats()),
        ["arm", when, o, name, rest @ ..] => {
            let name = if *name == "-" { "" } else { name };
            let mut t = match *when {
                "before" => Trigger::before(op(o)?, name),
                "after" => Trigger::after(op(o)?, name),
                other => bail!("before or after, not {other}"),
            };
            if let Some(skip) = rest.first() {
                t = t.skip(skip.parse().context("SKIP")?);
            }
            if let Some(phase) = rest.get(1) {
                t = t.during(phase);
            }
            control.arm(t);
            "armed\n".into()
        }
        ["marker", name, file, begin, end] => {
            let m = Marker {
                name: name.to_string(),
                file_suffix: file.to_string(),
                begin: begin.to_string(),
                end: end.to_string(),
            };
            control.add_marker(m);
            "ok\n".into()
        }
        _ => bail!("unknown command {line:?}"),
    })
}
