//! An echo bot in thirty lines: registers on first run (its identity and
//! outbox live in a profile directory), then answers every message with
//! the same text. Shows the whole `pipit_client::Client` API an app needs.
//!
//! ```sh
//! cargo run -p pipit-client --example echo -- 127.0.0.1:5222 ./echo-profile
//! ```

use pipit_client::{Client, Config, Event, FileStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "127.0.0.1:5222".into());
    let profile = args.next().unwrap_or_else(|| "echo-profile".into());

    let mut config = Config::new(server);
    config.device_name = "echo bot".into();
    let (client, mut events) = Client::start(config, FileStore::open(profile)?)?;

    while let Some(event) = events.next().await {
        match event {
            Event::Connected { account, .. } => println!("echo bot is account {account}"),
            Event::Message(m) if m.peer == 0 => {
                println!("{} says {:?}", m.from, String::from_utf8_lossy(&m.payload));
                client.mark_read(m.from, m.seq).await?;
                client.send(m.from, m.payload).await?;
            }
            Event::Disconnected { reason } => eprintln!("offline: {reason}"),
            Event::Stopped { reason } => return Err(reason.into()),
            _ => {}
        }
    }
    Ok(())
}
