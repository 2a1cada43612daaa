//! `orders-center tasks list|retry|cursors`: the dead-letter tools of the
//! API, and the log's cursors, from a shell with database access.

use anyhow::{bail, Result};
use store::{Store, TaskId};

use crate::config::TasksCommand;

/// Runs one `tasks` subcommand.
pub async fn run(store: &Store, command: &TasksCommand) -> Result<()> {
    match command {
        TasksCommand::List {
            destination,
            state,
            limit,
            after,
            json,
        } => {
            let tasks = store
                .list_tasks(destination.as_ref(), *state, after.map(TaskId), *limit)
                .await?;
            if *json {
                for t in &tasks {
                    println!("{}", serde_json::to_string(t)?);
                }
                return Ok(());
            }
            if tasks.is_empty() {
                eprintln!("no {} tasks", state.as_str());
                return Ok(());
            }
            println!(
                "{:>10}  {:<12} {:<22} {:<24} {:>7}  {:<10} {:>8}  {:<20}  LAST ERROR",
                "ID", "DESTINATION", "TYPE", "ORDER", "VERSION", "STATE", "ATTEMPTS", "UPDATED"
            );
            for t in &tasks {
                println!(
                    "{:>10}  {:<12} {:<22} {:<24} {:>7}  {:<10} {:>8}  {:<20}  {}",
                    t.id,
                    t.destination,
                    t.kind,
                    t.order_id,
                    t.version,
                    t.state.as_str(),
                    t.attempts,
                    t.updated_at.format("%Y-%m-%d %H:%M:%S"),
                    t.last_error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        TasksCommand::Retry { ids } => {
            let mut refused = 0;
            for &id in ids {
                match store.retry_task(TaskId(id)).await {
                    Ok(t) => println!(
                        "task {id}: pending again (order {} version {})",
                        t.order_id, t.version
                    ),
                    Err(e) => {
                        eprintln!("task {id}: {e}");
                        refused += 1;
                    }
                }
            }
            if refused > 0 {
                bail!("{refused} of {} tasks were not replayed", ids.len());
            }
            Ok(())
        }
        TasksCommand::Cursors { destination, json } => {
            let destinations = match destination {
                Some(d) => vec![d.clone()],
                None => store.log_destinations().await?,
            };
            let cursors = store.cursor_lag(&destinations).await?;
            if *json {
                for c in &cursors {
                    println!("{}", serde_json::to_string(c)?);
                }
                return Ok(());
            }
            if cursors.is_empty() {
                eprintln!("no log cursors: no event-stream destination has been read yet");
                return Ok(());
            }
            println!(
                "{:<12} {:>9}  {:>10}  {:>11}  {:<20}  {:<40}",
                "DESTINATION", "PARTITION", "LAG", "LAG (S)", "DELIVERED", "OWNER"
            );
            for c in &cursors {
                println!(
                    "{:<12} {:>9}  {:>10}  {:>11.1}  {:<20}  {:<40}",
                    c.destination,
                    c.partition,
                    c.events,
                    c.seconds(),
                    c.delivered_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "never".into()),
                    c.owner.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}
