delete from turns where tenant = ?1 and session_id = ?2 and id <> ?3
and id <= (select id from turns where tenant = ?1 and session_id = ?2 and id <> ?3
  order by id desc limit 1 offset ?4 - 1)
