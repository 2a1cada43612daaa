//! Where an order save and its saga meet: a save that carries a checkout
//! starts the order's saga in the same transaction. The dependency runs one
//! way: the saga (`saga.rs`) and this module use the order (`orders.rs`),
//! never the reverse.

use domain::ValidOrder;
use sqlx::PgConnection;

use crate::orders::{self, Precondition, SaveContext, Saved};
use crate::{Result, Store};

/// Writes one save inside the caller's transaction (see
/// [`orders::save_in`]), then starts the saga its checkout asks for.
pub(crate) async fn save_in(
    conn: &mut PgConnection,
    store: &Store,
    order: &ValidOrder,
    pre: Precondition,
    ctx: &SaveContext,
) -> Result<Saved> {
    let saved = orders::save_in(conn, store, order, pre, ctx).await?;
    if let Some(checkout) = &order.get().checkout {
        let o = &order.get().order;
        crate::saga::start(conn, store.saga_config(), order.id(), o.price, checkout).await?;
    }
    Ok(saved)
}

impl Store {
    /// Saves a whole order (create or replace), queues its events and, with
    /// a checkout, starts its saga.
    pub async fn save_order(
        &self,
        order: &ValidOrder,
        pre: Precondition,
        ctx: &SaveContext,
    ) -> Result<Saved> {
        let mut tx = self.pool().begin().await?;
        let saved = save_in(&mut tx, self, order, pre, ctx).await?;
        tx.commit().await?;
        Ok(saved)
    }
}
