-- A product's free and reserved units together stay within
-- inventory::stock::MAX_STOCK (10^12), so releasing a reservation can never
-- overflow. Levels set before the bound are brought under it.
UPDATE products p
SET available = GREATEST(0, 1000000000000 - h.held), updated_at = now()
FROM (SELECT q.product_id,
             coalesce(sum(l.quantity) FILTER (WHERE r.state = 'reserved'), 0) AS held
      FROM products q
      LEFT JOIN reservation_lines l ON l.product_id = q.product_id
      LEFT JOIN reservations r ON r.order_id = l.order_id
      GROUP BY q.product_id) h
WHERE p.product_id = h.product_id AND p.available > 1000000000000 - h.held;
